#!/usr/bin/env python3
"""The memory of a push rule's queue, read where nothing else moves it: fills the outbox of a
rule whose endpoint is dead with `--seconds` of `wrk` POSTs (2 × 1,000 topics), stops the
gateway, then starts each given build on that data dir and on an empty one, in turn, for
`--rounds` rounds, and prints the RSS each has once ready (the outbox is read before
`/readyz` answers 200).

    python3 bench/outbox_restart.py target/release /tmp/old/release
"""

import argparse
import importlib.machinery
import importlib.util
import json
import tempfile
from pathlib import Path

LOADER = importlib.machinery.SourceFileLoader("bench_run", str(Path(__file__).with_name("run")))
SPEC = importlib.util.spec_from_loader("bench_run", LOADER)
bench = importlib.util.module_from_spec(SPEC)
LOADER.exec_module(bench)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("builds", nargs="+", help="directories holding a topicgate binary")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    builds = [Path(b).resolve() for b in args.builds]
    queued = 'topicgate_push_queued{rule="dead"}'
    with tempfile.TemporaryDirectory(prefix="topicgate-outbox-") as workdir:
        rule = bench.push_rule("dead", "dead/+", bench.free_port(), "max_queued = 1000000\n")
        config = bench.push_config(workdir, "dead", rule)
        bench.RELEASE = builds[0]
        gw = bench.start_topicgate(Path(workdir) / "full", config)
        try:
            published, command = bench.wrk_topics(gw.http, "dead", args.seconds, topics=1000)
            filled = bench.metric_value(gw.http, queued)
        finally:
            gw.stop()
        print(json.dumps({"published": published, "queued": int(filled), "command": command}))
        for turn in range(args.rounds):
            for build in builds:
                for data in ["empty", "full"]:
                    bench.RELEASE = build
                    gw = bench.start_topicgate(Path(workdir) / data, config)
                    try:
                        print(json.dumps({"round": turn + 1, "build": str(build), "data_dir": data,
                                          "queued": int(bench.metric_value(gw.http, queued)),
                                          "rss_kib": gw.rss(),
                                          "ready_ms": round(gw.ready_after * 1000)}), flush=True)
                    finally:
                        gw.stop()


if __name__ == "__main__":
    main()
