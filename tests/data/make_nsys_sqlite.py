"""Writes tests/data/nsys_rank.sqlite: a tiny export in the documented nsys SQLite schema.

Tables and columns follow the Nsight Systems "SQLite Export Schema Reference" (a subset of each
table's columns; nsys creates tables lazily, so readers must cope with missing ones). Event times
are ns since the session start, whose UTC time is TARGET_INFO_SESSION_START_TIME.utcEpochNs.
The NVTX range "spmd.sync:5000000000" is the marker spmd/obs/profile.py records when its window opens
(5000000000 = the rank's perf_counter_ns then). Run: python tests/data/make_nsys_sqlite.py
"""
import sqlite3
from pathlib import Path

OUT = Path(__file__).with_name("nsys_rank.sqlite")
UTC_START = 1_800_000_000_000_000_000
SCHEMA = """
CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE TARGET_INFO_SESSION_START_TIME (utcEpochNs INT, utcTime TEXT, localTime TEXT);
CREATE TABLE ENUM_CUDA_MEMCPY_OPER (id INTEGER PRIMARY KEY, name TEXT, label TEXT);
CREATE TABLE NVTX_EVENTS (start INT NOT NULL, end INT, eventType INT NOT NULL, rangeId INT, category INT,
  color INT, text TEXT, globalTid INT, endGlobalTid INT, textId INT REFERENCES StringIds(id), domainId INT);
CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INT NOT NULL, end INT NOT NULL, deviceId INT NOT NULL,
  contextId INT NOT NULL, streamId INT NOT NULL, correlationId INT, globalPid INT,
  demangledName INT NOT NULL REFERENCES StringIds(id), shortName INT NOT NULL REFERENCES StringIds(id),
  mangledName INT REFERENCES StringIds(id), gridX INT, gridY INT, gridZ INT, blockX INT, blockY INT, blockZ INT);
CREATE TABLE CUPTI_ACTIVITY_KIND_MEMCPY (start INT NOT NULL, end INT NOT NULL, deviceId INT NOT NULL,
  contextId INT NOT NULL, streamId INT NOT NULL, correlationId INT, globalPid INT, bytes INT NOT NULL,
  copyKind INT NOT NULL, srcKind INT, dstKind INT);
CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INT NOT NULL, end INT NOT NULL, eventClass INT,
  globalTid INT, correlationId INT, nameId INT REFERENCES StringIds(id), returnValue INT);
"""
STRINGS = [(1, "ncclDevKernel_AllReduce_Sum_f32_RING_LL"),
           (2, "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)"),
           (3, "gemm_bf16_tn"), (4, "void gemm_bf16_tn<128, 64>(Params)"),
           (5, "attn.o_proj.all_reduce"), (6, "cudaLaunchKernel_v7000")]
NVTX = [  # start, end, eventType (59 push/pop, 60 start/end, 34 mark), text, textId
    (1_000_000, 1_001_000, 59, "spmd.sync:5000000000", None),
    (2_000_000, 2_500_000, 59, "attn", None),
    (2_500_000, 2_600_000, 59, None, 5),   # registered string: the name is in StringIds
    (900_000, 3_000_000, 60, "window", None),
    (2_700_000, None, 59, "unfinished", None),
    (2_800_000, 2_800_000, 34, "a mark", None),
]
KERNELS = [(2_100_000, 2_400_000, 0, 1, 7, 11, 4, 3), (2_520_000, 2_590_000, 0, 1, 13, 12, 2, 1)]
MEMCPY = [(1_500_000, 1_510_000, 0, 1, 7, 13, 4096, 1), (2_950_000, 2_960_000, 0, 1, 7, 14, 32768, 2)]


def main() -> None:
    OUT.unlink(missing_ok=True)
    con = sqlite3.connect(OUT)
    con.executescript(SCHEMA)
    con.executemany("INSERT INTO StringIds VALUES (?, ?)", STRINGS)
    con.execute("INSERT INTO TARGET_INFO_SESSION_START_TIME VALUES (?, '2027-01-15T08:00:00Z', '')",
                (UTC_START,))
    con.executemany("INSERT INTO ENUM_CUDA_MEMCPY_OPER VALUES (?, ?, ?)",
                    [(1, "CUDA_MEMCPY_OPER_HTOD", "Host-to-Device"), (2, "CUDA_MEMCPY_OPER_DTOH", "Device-to-Host")])
    con.executemany("INSERT INTO NVTX_EVENTS (start, end, eventType, text, textId, globalTid) "
                    "VALUES (?, ?, ?, ?, ?, 1)", NVTX)
    con.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL (start, end, deviceId, contextId, streamId, correlationId,"
                    " demangledName, shortName, globalPid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)", KERNELS)
    con.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_MEMCPY (start, end, deviceId, contextId, streamId, correlationId,"
                    " bytes, copyKind, globalPid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)", MEMCPY)
    con.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME (start, end, correlationId, nameId) VALUES (?, ?, ?, 6)",
                    [(2_050_000, 2_060_000, 11), (2_510_000, 2_515_000, 12)])
    con.commit()
    con.close()


if __name__ == "__main__":
    main()
