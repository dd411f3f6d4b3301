#!/usr/bin/env python3
"""Read HdrHistogram interval logs with the `hdrhistogram` package's
HistogramLogReader, as a user's tooling would.

Usage: hdr_log_summary.py FILE...

Prints one JSON object: {"intervals": n, "lines": n, "tags": {TAG: {"count",
"min", "max"}}}, where "intervals" is how many interval histograms the reader
decoded and "lines" how many interval lines the files have (they must
agree), and each tag sums its intervals over all files. Exits with 3 when
the package is missing.
"""

import json
import sys

try:
    from hdrh.histogram import HdrHistogram
    from hdrh.log import HistogramLogReader
except ImportError:
    sys.exit(3)

# Microseconds: up to a week, two significant digits, like socktrace.
WEEK_US = 7 * 24 * 3600 * 1_000_000


def main():
    tags = {}
    intervals = 0
    lines = 0
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as log:
            lines += sum(1 for line in log if line.startswith("Tag="))
        reader = HistogramLogReader(path, HdrHistogram(1, WEEK_US, 2))
        while True:
            histogram = reader.get_next_interval_histogram()
            if histogram is None:
                break
            intervals += 1
            tag = histogram.get_tag()
            if tag not in tags:
                tags[tag] = HdrHistogram(1, WEEK_US, 2)
            tags[tag].add(histogram)
        reader.close()
    summary = {
        tag: {
            "count": histogram.get_total_count(),
            "min": histogram.get_min_value(),
            "max": histogram.get_max_value(),
        }
        for tag, histogram in tags.items()
    }
    print(json.dumps({"intervals": intervals, "lines": lines, "tags": summary}))


if __name__ == "__main__":
    main()
