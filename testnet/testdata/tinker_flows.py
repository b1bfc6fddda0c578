"""The unmodified tinker SDK against a Signal testnet (testnet/tinker_test.go).

Usage: python tinker_flows.py FLOW BASE_URL API_KEY [MODEL]

Each flow prints one JSON line per result ("RESULT {...}"); a flow that
pauses for the Go side to break something prints "PAUSE <what>" and reads
one line from stdin before it goes on. Assertions live in the Go test, which
reads the results; the script only fails on what the SDK itself raises.
"""

import json
import os
import sys
import time

import tinker
from tinker import types

FLOW, BASE_URL, API_KEY = sys.argv[1], sys.argv[2], sys.argv[3]
MODEL = sys.argv[4] if len(sys.argv) > 4 else "signal-tiny"
os.environ["TINKER_BASE_URL"] = BASE_URL
os.environ["TINKER_API_KEY"] = API_KEY

# One short text, tokenized once by the Go side's choice of ids (any ids
# below the vocabulary work: the model learns to repeat the sequence).
TOKENS = [1, 415, 5255, 3290, 356, 272, 2130, 28723] * 4


def emit(**kw):
    print("RESULT " + json.dumps(kw), flush=True)


def pause(what):
    print("PAUSE " + what, flush=True)
    sys.stdin.readline()


def sft_datum(toks=TOKENS):
    return types.Datum(
        model_input=types.ModelInput.from_ints(toks[:-1]),
        loss_fn_inputs={"target_tokens": toks[1:], "weights": [1.0] * (len(toks) - 1)},
    )


def step(tc, lr=1e-2):
    """One pipelined step: forward_backward and optim_step in flight together."""
    fb = tc.forward_backward([sft_datum()], "cross_entropy")
    op = tc.optim_step(types.AdamParams(learning_rate=lr))
    return fb.result().metrics["loss:sum"], op.result().metrics


def flow_supervised():
    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(base_model=MODEL, rank=4, seed=3).result()
    info = tc.get_info()
    tok = tc.get_tokenizer()
    emit(what="info", model_id=tc.model_id, model_name=info.model_data.model_name,
         tokenizer_id=info.model_data.tokenizer_id, decoded=tok.decode(TOKENS[1:8]))
    losses, steps = [], []
    t0 = time.perf_counter()
    for _ in range(10):
        loss, m = step(tc)
        losses.append(loss)
        steps.append(m["step:max"])
    emit(what="step_latency", seconds=(time.perf_counter() - t0) / 10)
    path = tc.save_state("s10").result().path
    for _ in range(5):
        loss, m = step(tc)
        losses.append(loss)
        steps.append(m["step:max"])
    emit(what="losses", losses=losses, steps=steps, path=path)
    # A new client from the saved state with its optimizer: the next five
    # steps are the ones the first client took.
    tc2 = sc.create_training_client_from_state_with_optimizer(path).result()
    resumed = [step(tc2)[0] for _ in range(5)]
    # Without the optimizer: same weights, fresh moments.
    tc3 = sc.create_training_client_from_state(path).result()
    fresh = [step(tc3)[0] for _ in range(2)]
    emit(what="resumed", losses=resumed, fresh=fresh, model_id=tc2.model_id)
    rc = sc.create_rest_client()
    cps = rc.list_checkpoints(tc.model_id).result().checkpoints
    emit(what="checkpoints", paths=[c.tinker_path for c in cps], sizes=[c.size_bytes for c in cps])
    runs = rc.list_training_runs().result().training_runs
    emit(what="runs", ids=[r.training_run_id for r in runs])
    # The SDK's own CLI downloads the checkpoint: through a training client
    # loaded from it, save_weights_external, signed URLs, a TTL, a delete.
    out = os.path.join(os.environ["FLOW_TMP"], "download")
    import subprocess
    subprocess.run([sys.executable, "-W", "ignore", "-m", "tinker.cli", "checkpoint", "download", path, "-o", out],
                   check=True, stdout=subprocess.DEVNULL)
    files = {}
    for root, _, names in os.walk(out):
        for n in names:
            files[n] = os.path.join(root, n)
    emit(what="download", files=files)
    rc.delete_checkpoint_from_tinker_path(path).result()
    emit(what="after_delete", paths=[c.tinker_path for c in rc.list_checkpoints(tc.model_id).result().checkpoints])


def flow_rl():
    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(base_model=MODEL, rank=4).result()
    for _ in range(3):
        step(tc)
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(TOKENS[:6])
    res = sampler.sample(prompt, 3, types.SamplingParams(max_tokens=6, temperature=1.0, seed=5)).result()
    seqs = [{"tokens": list(s.tokens), "logprobs": list(s.logprobs), "stop_reason": s.stop_reason} for s in res.sequences]
    emit(what="samples", sequences=seqs)
    # RL datums as recipes build them: no weights.
    data = []
    for s in res.sequences:
        full = TOKENS[:6] + list(s.tokens)
        n = len(full) - 1
        lps = [0.0] * 5 + list(s.logprobs)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(full[:-1]), loss_fn_inputs={
            "target_tokens": full[1:], "logprobs": lps[:n], "advantages": [0.0] * 5 + [1.0] * (n - 5)}))
    out = {}
    for loss in ["importance_sampling", "ppo", "cispo", "dro"]:
        r = tc.forward_backward(data, loss).result()
        out[loss] = {"loss": r.metrics["loss:sum"], "logprobs": [o["logprobs"].tolist() for o in r.loss_fn_outputs]}
    out["optim"] = tc.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics
    emit(what="rl", **out)
    # compute_logprobs is forward's logprobs of the same tokens.
    n = 9
    lp = sampler.compute_logprobs(types.ModelInput.from_ints(TOKENS[:n])).result()
    fresh = tc.save_weights_and_get_sampling_client().result()
    lp2 = fresh.compute_logprobs(types.ModelInput.from_ints(TOKENS[:n])).result()
    fw = tc.forward([sft_datum(TOKENS[:n])], "cross_entropy").result()
    # Top-k prompt logprobs: each position's 3 most likely tokens.
    topk = fresh.sample(types.ModelInput.from_ints(TOKENS[:n]), 1, types.SamplingParams(max_tokens=1),
                        include_prompt_logprobs=True, topk_prompt_logprobs=3).result()
    last3 = fresh.compute_logprobs(types.ModelInput.from_ints(TOKENS[:n]), prompt_logprobs_last_n=3).result()
    emit(what="logprobs", sampler=lp, fresh=lp2, forward=fw.loss_fn_outputs[0]["logprobs"].tolist(), last3=last3,
         topk=[None if t is None else [[int(i), float(v)] for i, v in t] for t in topk.topk_prompt_logprobs],
         topk_prompt=topk.prompt_logprobs)

    def custom(batch, logprobs):
        loss = sum((-l).sum() for l in logprobs)
        return loss, {"nll:sum": float(loss)}

    r = tc.forward_backward_custom([sft_datum()], custom).result()
    ce = tc.forward([sft_datum()], "cross_entropy").result()
    emit(what="custom", metrics=r.metrics, forward_loss=ce.metrics["loss:sum"])
    base = sc.create_sampling_client(base_model=MODEL)
    b = base.sample(prompt, 1, types.SamplingParams(max_tokens=4, temperature=0.0)).result()
    named = tc.save_weights_for_sampler("named").result().path
    ps = sc.create_sampling_client(model_path=named)
    p = ps.sample(prompt, 1, types.SamplingParams(max_tokens=4, temperature=0.0)).result()
    live = tc.save_weights_and_get_sampling_client().result()
    q = live.sample(prompt, 1, types.SamplingParams(max_tokens=4, temperature=0.0)).result()
    stop = live.sample(prompt, 1, types.SamplingParams(max_tokens=8, temperature=0.0, stop=[q.sequences[0].tokens[1]])).result()
    emit(what="samplers", base=list(b.sequences[0].tokens), path=list(p.sequences[0].tokens),
         live=list(q.sequences[0].tokens), stop=list(stop.sequences[0].tokens), stop_reason=stop.sequences[0].stop_reason)
    # Closing the ServiceClient ends its session's runs (models and samplers).
    sc.close("success").result()
    emit(what="closed", model_id=tc.model_id)


def flow_errors():
    out = {}

    def attempt(name, fn):
        t0 = time.perf_counter()
        try:
            fn()
            out[name] = {"error": None}
        except Exception as e:  # the SDK's own exception types, by name
            status = getattr(e, "status_code", None)
            out[name] = {"error": type(e).__name__, "status": status, "message": str(e)[:400],
                         "seconds": time.perf_counter() - t0}

    attempt("bad_key", lambda: tinker.ServiceClient(api_key="tml-sk-sig-nope").create_lora_training_client(base_model=MODEL, rank=4).result())
    sc = tinker.ServiceClient()
    attempt("unknown_model", lambda: sc.create_lora_training_client(base_model="no/such-model", rank=4).result())
    tc = sc.create_lora_training_client(base_model=MODEL, rank=4).result()
    bad = types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:5]),
                      loss_fn_inputs={"target_tokens": TOKENS[1:4], "weights": [1.0] * 3})
    attempt("short_targets", lambda: tc.forward_backward([bad], "cross_entropy").result())
    emit(what="errors", **out)


def flow_poor():
    """An account without credits: its first billed call fails at once."""
    out = {}
    sc = tinker.ServiceClient()
    t0 = time.perf_counter()
    try:
        tc = sc.create_lora_training_client(base_model=MODEL, rank=4).result()
        tc.forward_backward([sft_datum()], "cross_entropy").result()
        out = {"error": None}
    except Exception as e:
        out = {"error": type(e).__name__, "message": str(e)[:400]}
    out["seconds"] = time.perf_counter() - t0
    emit(what="poor", **out)


def flow_survive():
    """A pipelined loop that pauses twice for the Go side to kill things."""
    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(base_model=MODEL, rank=4).result()
    losses = []
    for i in range(20):
        if i in (6, 13):
            # Calls in flight while the Go side kills a leader or a node.
            fb = tc.forward_backward([sft_datum()], "cross_entropy")
            op = tc.optim_step(types.AdamParams(learning_rate=1e-2))
            pause("leader" if i == 6 else "node")
            losses.append(fb.result().metrics["loss:sum"])
            op.result()
            continue
        losses.append(step(tc)[0])
    emit(what="survive", losses=losses, model_id=tc.model_id)


{"supervised": flow_supervised, "rl": flow_rl, "errors": flow_errors, "poor": flow_poor, "survive": flow_survive}[FLOW]()
