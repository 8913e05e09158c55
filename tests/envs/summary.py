"""One line per vLLM release ``make test`` ran on (its tests and time, from each
run's JUnit report), then the totals: ``N passed, N failed, N skipped``."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def counts(report: str) -> tuple[int, int, int, float]:
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    failed = int(suite.get("failures")) + int(suite.get("errors"))
    return tests - failed - skipped, failed, skipped, float(suite.get("time"))


if __name__ == "__main__":
    totals = [0, 0, 0]
    for label, report in zip(sys.argv[1::2], sys.argv[2::2]):
        passed, failed, skipped, seconds = counts(report)
        print(f"{label}: {passed} passed, {failed} failed, {skipped} skipped in {seconds:.0f} s")
        totals = [t + n for t, n in zip(totals, (passed, failed, skipped))]
    print(f"{totals[0]} passed, {totals[1]} failed, {totals[2]} skipped")
    sys.exit(1 if totals[1] else 0)
