"""Step latency of one training step (forward_backward + optim_step) seen
by a client, over a testnet: the tinker SDK through /api/v1 (both calls in
flight together, as recipes pipeline them) against Signal's Python SDK on
/v1, synchronous (one call, then the other) and pipelined (train_step: both
in one round trip). Prints one JSON line.

Usage: tinker_bench.py TESTNET_JSON STEPS
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
import tinker  # noqa: E402
from tinker import types  # noqa: E402
from signal_sdk import SignalClient  # noqa: E402

net = json.load(open(sys.argv[1]))
steps = int(sys.argv[2])
base = net["coordinators"][-1]
model = net["models"][0]
toks = [1, 415, 5255, 3290, 356, 272, 2130, 28723] * 4

os.environ["TINKER_BASE_URL"] = base
os.environ["TINKER_API_KEY"] = "tml-" + net["api_key"]
tc = tinker.ServiceClient().create_lora_training_client(base_model=model, rank=4).result()
datum = types.Datum(model_input=types.ModelInput.from_ints(toks[:-1]),
                    loss_fn_inputs={"target_tokens": toks[1:], "weights": [1.0] * (len(toks) - 1)})
tinker_s = []
for i in range(steps + 2):
    t0 = time.perf_counter()
    fb = tc.forward_backward([datum], "cross_entropy")
    op = tc.optim_step(types.AdamParams(learning_rate=1e-3))
    fb.result(), op.result()
    if i >= 2:  # warm-up
        tinker_s.append(time.perf_counter() - t0)

sc = SignalClient(base_url=base, api_key=net["api_key"])
run = sc.create_run(model, lora_rank=4)
d = {"model_input": {"tokens": toks[:-1]}, "loss_fn_inputs": {"target_tokens": toks[1:], "weights": [1.0] * (len(toks) - 1)}}
sync_s = []
for i in range(steps + 2):
    t0 = time.perf_counter()
    run.forward_backward([d])
    run.optim_step(learning_rate=1e-3)
    if i >= 2:
        sync_s.append(time.perf_counter() - t0)
pipe_s = []
for i in range(steps + 2):
    t0 = time.perf_counter()
    run.train_step([d], learning_rate=1e-3)
    if i >= 2:
        pipe_s.append(time.perf_counter() - t0)
print(json.dumps({"tokens": len(toks) - 1, "steps": steps,
                  "tinker_pipelined_ms": 1000 * statistics.median(tinker_s),
                  "v1_sync_ms": 1000 * statistics.median(sync_s),
                  "v1_pipeline_ms": 1000 * statistics.median(pipe_s)}))
