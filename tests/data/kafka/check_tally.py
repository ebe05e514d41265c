"""Reads Tally segment files (concatenated record batches) with kafka-python
and prints each batch's codec and records, failing on anything it cannot
decode: the check that Tally's compressed batches are Kafka's.

    venv/bin/python tests/data/kafka/check_tally.py DATA_DIR/TOPIC-0/00000000000000000000.log ...

tests/data/kafka/tally/*.bin are batches Tally's encoder made; its output on
them is tests/data/kafka/tally/kafka-python.txt, and the `interop` test checks
that Tally still makes exactly those bytes.
"""
import sys

from kafka.record.default_records import DefaultRecordBatch

NAMES = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


def batches(data):
    pos = 0
    while pos + 61 <= len(data):
        length = int.from_bytes(data[pos + 8:pos + 12], "big", signed=True)
        if length <= 0:
            break  # zeros after the last batch (preallocated space)
        end = pos + 12 + length
        yield data[pos:end]
        pos = end


def main():
    total = 0
    for path in sys.argv[1:]:
        with open(path, "rb") as f:
            data = f.read()
        for raw in batches(data):
            batch = DefaultRecordBatch(bytearray(raw))
            assert batch.validate_crc(), path
            records = list(batch)
            assert len(records) == batch.last_offset_delta + 1 if hasattr(batch, "last_offset_delta") else True
            print(f"{path}: base offset {batch.base_offset}, {NAMES[batch.compression_type]}, "
                  f"{len(records)} records, first value {records[0].value[:20]!r}")
            total += len(records)
    print(f"{total} records decoded by kafka-python")


if __name__ == "__main__":
    main()
