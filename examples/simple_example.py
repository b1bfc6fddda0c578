#!/usr/bin/env python3
"""Signal's simple example: fine-tune a LoRA adapter for 20 steps, sample, save.

    SIGNAL_URL=http://127.0.0.1:8080 SIGNAL_API_KEY=sk-... python3 examples/simple_example.py
    python3 examples/simple_example.py --testnet .cache/testnet      # or SIGNAL_TESTNET=.cache/testnet

Each step sends the same small batch of text (tokenized on the node with the
run's tokenizer), so the loss falls as the adapter learns it. Every 5 steps
(from step 0, before any training) it samples a continuation; at the end it saves the adapter and prints where
it is. The last line is ``SUMMARY {json}`` for scripts.
"""

import argparse
import json
import os
import sys
import time

# Run from a checkout without installing the SDK.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from signal_sdk import SignalClient, SignalError  # noqa: E402

# A tiny built-in dataset: short, regular sentences a small model can learn in 20 steps.
DATASET = [
    "The cat sat on the mat.",
    "The dog sat on the log.",
    "The bird sat on the branch.",
    "The fox sat on the box.",
    ("Question: What color is the sky?\nAnswer:", " The sky is blue."),
    ("Question: What color is grass?\nAnswer:", " Grass is green."),
]
PROMPTS = ["The cat sat", "Question: What color is the sky?\nAnswer:"]


def credits(micro):
    """Micro-credits (the API's integers) as a decimal number of credits."""
    return "%d.%06d" % divmod(micro, 1_000_000)


def cost_of(answer):
    """What a billed answer cost, in micro-credits."""
    return answer.get("cost", {}).get("micro_credits", 0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--testnet", default=os.environ.get("SIGNAL_TESTNET"),
                    help="read the coordinators and API key from this testnet.json or testnet directory (default $SIGNAL_TESTNET)")
    ap.add_argument("--url", help="coordinator URL (default $SIGNAL_URL)")
    ap.add_argument("--api-key", help="API key (default $SIGNAL_API_KEY)")
    ap.add_argument("--base-model", default=os.environ.get("SIGNAL_BASE_MODEL", "signal-tiny"),
                    help="base model (default $SIGNAL_BASE_MODEL or signal-tiny)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sample-every", type=int, default=5)
    ap.add_argument("--learning-rate", type=float, default=5e-3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--tokens", action="store_true",
                    help="send token Datum built with the tokenize endpoint instead of text examples")
    ap.add_argument("--keep-run", action="store_true", help="do not end the run at the end")
    args = ap.parse_args(argv)

    if args.testnet:
        client = SignalClient.from_testnet(args.testnet)
        if args.url or args.api_key:
            client = SignalClient(args.api_key or client.api_key, args.url or client.base_urls)
    else:
        client = SignalClient(args.api_key, args.url)

    t0 = time.monotonic()
    losses, total_cost, balance = [], 0, None
    # The with block ends the run however the block ends, so its node
    # session is freed; --keep-run leaves it open.
    with client.create_run(args.base_model, lora_rank=args.lora_rank, seed=1, name="simple-example") as run:
        if args.keep_run:
            run.keep_open()
        print("run %s on %s (rank %d), node %s" % (run.id, run.base_model, args.lora_rank, run.info.get("node", "-")))
        batch = []
        for item in DATASET:
            if not args.tokens:
                batch.append(item)
            elif isinstance(item, tuple):
                batch.append(run.datum_from_text(item[0], item[1]))
            else:
                batch.append(run.datum_from_text("", item))

        for i in range(args.steps):
            ts = time.monotonic()
            fb = run.forward_backward(batch)
            st = run.optim_step(learning_rate=args.learning_rate)
            cost = cost_of(fb) + cost_of(st)
            total_cost += cost
            balance = st.get("balance_micro_credits", fb.get("balance_micro_credits", balance))
            losses.append(fb["loss_mean"])
            print("step %2d  loss %.4f  tokens %d  grad_norm %.4f  lr %.2g  cost %s  (%.1fs)" % (
                st["step"], fb["loss_mean"], fb["tokens"], st.get("grad_norm", fb.get("grad_norm") or 0.0),
                st.get("learning_rate", args.learning_rate), credits(cost), time.monotonic() - ts), flush=True)
            if i % args.sample_every == 0:
                sm = run.sample(PROMPTS, max_tokens=args.max_tokens, temperature=0.7, seed=i)
                total_cost += cost_of(sm)
                balance = sm.get("balance_micro_credits", balance)
                for prompt, samples in zip(PROMPTS, sm["samples"]):
                    print("  sample  %r -> %r" % (prompt, samples[0]["text"]), flush=True)

        saved = run.save_state(mode="adapter", name="simple-example")
        total_cost += cost_of(saved)
        balance = saved.get("balance_micro_credits", balance)
        ck = saved["checkpoint"]
        print("saved adapter at step %d: %s" % (ck["step"], ck["uri"]))
        for f in ck.get("files", []):
            print("  %-28s %8d bytes  cid %s" % (f["name"], f["size"], f["cid"]))
    first, last = (losses[0], losses[-1]) if losses else (float("nan"), float("nan"))
    print("loss %.4f -> %.4f over %d steps (%s); cost %s credits; balance %s credits; %.1fs" % (
        first, last, len(losses), "falling" if last < first else "NOT falling", credits(total_cost),
        credits(balance) if balance is not None else "-", time.monotonic() - t0))
    print("SUMMARY " + json.dumps({
        "run_id": run.id, "losses": losses, "cost_micro_credits": total_cost, "balance_micro_credits": balance,
        "checkpoint_uri": ck["uri"], "checkpoint_id": ck["id"],
    }), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SignalError as e:
        print("simple_example: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        sys.exit(1)
    except ValueError as e:
        print("simple_example: %s" % e, file=sys.stderr)
        sys.exit(2)
