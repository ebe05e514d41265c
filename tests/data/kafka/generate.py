"""Builds the record batch fixtures in this directory with kafka-python's own
encoder (a Kafka client library, not Tally's), one per codec, and writes what
each batch holds to expected.json.

    python3 -m venv venv && venv/bin/pip install kafka-python==2.0.2 python-snappy lz4 zstandard
    venv/bin/python tests/data/kafka/generate.py

The checked-in .bin files are what the Rust tests read; regenerate only to
add cases. Batches are deterministic (fixed timestamps), but gzip, lz4 and
zstd output may differ between library versions, so the tests compare the
decoded records, never the compressed bytes.
"""
import json
import os

from kafka.record.default_records import DefaultRecordBatchBuilder, DefaultRecordBatch

CODECS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
HERE = os.path.dirname(os.path.abspath(__file__))


def records():
    out = []
    for i in range(20):
        key = None if i % 5 == 0 else ("key-%d" % i).encode()
        value = ("value %d " % i).encode() * (i + 1)
        headers = [("h%d" % j, ("v%d" % j).encode()) for j in range(i % 3)]
        out.append((1700000000000 + i * 7, key, value, headers))
    return out


def main():
    expected = {}
    for name, codec in CODECS.items():
        builder = DefaultRecordBatchBuilder(
            magic=2, compression_type=codec, is_transactional=False,
            producer_id=-1, producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
        for offset, (ts, key, value, headers) in enumerate(records()):
            builder.append(offset, timestamp=ts, key=key, value=value, headers=headers)
        data = bytes(builder.build())
        with open(os.path.join(HERE, name + ".bin"), "wb") as f:
            f.write(data)
        batch = DefaultRecordBatch(data)
        assert batch.compression_type == codec, (name, batch.compression_type)
        expected[name] = [
            {
                "offset_delta": r.offset,
                "timestamp": r.timestamp,
                "key": None if r.key is None else r.key.hex(),
                "value": r.value.hex(),
                "headers": [[k, v.hex()] for k, v in r.headers],
            }
            for r in batch
        ]
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
