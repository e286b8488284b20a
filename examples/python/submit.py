#!/usr/bin/env python3
"""Submit one rbee inference job from Python, with nothing but nats-py.

The wire contract (schemas/json/) is all a client needs: subscribe to the
job's event subject, publish the job to the jobs stream with the job id as
Nats-Msg-Id, print token events until the terminal one.

    pip install nats-py
    python3 examples/python/submit.py --url nats://127.0.0.1:4222 "Write a haiku about bees"

Exit status: 0 done, 1 the job failed (its code and message on stderr).
"""
import argparse
import asyncio
import json
import sys
import uuid

import nats


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt")
    p.add_argument("--url", default="nats://127.0.0.1:4222")
    p.add_argument("--model", default="smollm2-135m", help="alias (subject-safe model key)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int)
    args = p.parse_args()

    nc = await nats.connect(args.url)
    job_id = uuid.uuid4().hex
    # Subscribe before publishing: a warm hive can answer before the publish ack arrives.
    events = await nc.subscribe(f"rbee.events.{job_id}")
    body = {"messages": [{"role": "user", "content": args.prompt}], "max_tokens": args.max_tokens}
    if args.seed is not None:
        body["seed"] = args.seed
    js = nc.jetstream()
    await js.publish(f"rbee.jobs.infer.{args.model}", json.dumps(body).encode(), headers={"Nats-Msg-Id": job_id})

    status, expected = 1, 0
    async for msg in events.messages:
        event = json.loads(msg.data)
        if event["seq"] != expected:
            print(f"error: event {event['seq']} arrived, {expected} expected", file=sys.stderr)
            break
        expected += 1
        kind = event["type"]
        if kind == "token":
            print(event["text"], end="", flush=True)
        elif kind == "started":
            print(f"[{job_id} on hive {event['hive']}, {'cold' if event['cold'] else 'warm'} start]", file=sys.stderr)
        elif kind == "restarted":
            print(f"\n[attempt {event['attempt']} failed: {event['reason']}; starting over]", file=sys.stderr)
        elif kind == "done":
            t = event["timings"]
            print()
            print(f"[done: {event['stop_reason']}, {event['usage']['completion_tokens']} tokens, "
                  f"first token {t['ttft_ms']:.0f} ms, {t['decode_tps']:.1f} tok/s]", file=sys.stderr)
            status = 0
            break
        elif kind == "error":
            print(f"\nerror: {event['code']}: {event['message']}", file=sys.stderr)
            break
    await nc.close()
    return status


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
