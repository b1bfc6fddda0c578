"""Signal's Python SDK: a client for the public HTTP API (standard library only).

Calls answered 429 or 503 are retried with jittered exponential backoff that
honours ``Retry-After``; every mutating call carries an ``Idempotency-Key``
generated once per logical call and reused on each retry, so the server
executes and charges it at most once.
"""

import base64
import concurrent.futures
import decimal
import email.utils
import hashlib
import ipaddress
import json
import math
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import __version__
from .errors import (
    ResponseTooLargeError,
    TooLargeError,
    SignalConnectionError,
    SignalError,
    error_from_response,
)

__all__ = ["SignalClient", "SignalRun", "datum_from_tokens", "micro_credits", "format_credits", "raw_cid"]

API_PREFIX = "/v1"
IDEMPOTENCY_HEADER = "Idempotency-Key"
REQUEST_ID_HEADER = "X-Request-Id"

# A forward_backward on a CPU node can take minutes; this bounds each socket
# wait, not the whole call.
DEFAULT_TIMEOUT_S = 900.0
DEFAULT_MAX_RETRIES = 5
DEFAULT_MIN_BACKOFF_S = 0.25
# Caps every wait, Retry-After included, so a confused server cannot park a
# client for hours.
DEFAULT_MAX_BACKOFF_S = 30.0
DEFAULT_MAX_RESPONSE_BYTES = 256 << 20
# The coordinator's default body limit. A server answers a larger body with
# 413 and closes the connection while urllib is still sending, which urllib
# reports as a broken pipe, so the SDK checks the size before sending.
DEFAULT_MAX_REQUEST_BYTES = 32 << 20
_MAX_ERROR_BODY_BYTES = 64 << 10

Json = Dict[str, Any]
# An item of a batch: a Datum dict, a TextExample dict, a text, or a
# (prompt, completion) pair.
BatchItem = Union[Json, str, Tuple[str, str]]


def _parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Reads Retry-After: delay-seconds (a fraction is accepted) or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        secs = when.timestamp() - time.time()
    if math.isnan(secs) or secs <= 0:
        return None
    return min(secs, 86400.0)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def datum_from_tokens(prompt: Sequence[int], completion: Sequence[int]) -> Json:
    """Builds a next-token Datum that trains on the completion only.

    The model reads every token but the last and predicts each following one;
    predictions of completion tokens weigh 1, of prompt tokens 0.
    """
    prompt, completion = list(prompt), list(completion)
    tokens = prompt + completion
    if not completion or len(tokens) < 2:
        raise ValueError(
            "datum needs >= 2 tokens with >= 1 in the completion, got prompt %d, completion %d"
            % (len(prompt), len(completion))
        )
    weights = [1.0 if i + 1 >= len(prompt) else 0.0 for i in range(len(tokens) - 1)]
    return {
        "model_input": {"tokens": tokens[:-1]},
        "loss_fn_inputs": {"target_tokens": tokens[1:], "weights": weights},
    }


MICRO_PER_CREDIT = 1_000_000
# The API's amounts are integers of micro-credits; JSON clients holding
# doubles read them exactly up to 2**53.
MAX_MICRO_CREDITS = 1 << 53


def micro_credits(credits: Union[int, float, str, decimal.Decimal]) -> int:
    """A number of credits (``12``, ``0.5``, ``"1000.000001"``) as the API's micro-credits, exactly.

    A float is read through its shortest decimal form (``0.1`` is 100000),
    never through its binary value; more than six decimals is an error.
    """
    if isinstance(credits, bool):
        raise ValueError("credits %r: want a number of credits" % (credits,))
    try:
        d = decimal.Decimal(repr(credits) if isinstance(credits, float) else credits)
    except (decimal.InvalidOperation, TypeError, ValueError):
        raise ValueError("credits %r: want a number of credits, e.g. 12.5" % (credits,)) from None
    micro = d * MICRO_PER_CREDIT
    if not d.is_finite() or micro != micro.to_integral_value() or micro < 0 or micro > MAX_MICRO_CREDITS:
        raise ValueError("credits %r: want a non-negative number of credits with at most 6 decimals, at most %s"
                         % (credits, format_credits(MAX_MICRO_CREDITS)))
    return int(micro)


def format_credits(micro: int) -> str:
    """Micro-credits (the API's integers) as a decimal number of credits: ``12500000`` is ``"12.500000"``."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(int(micro)), MICRO_PER_CREDIT)
    return "%s%d.%06d" % (sign, whole, frac)


def _amount(credits: Any, micro: Optional[int], what: str) -> int:
    """The micro-credits an admin helper was given, as credits or as micro-credits."""
    if (credits is None) == (micro is None):
        raise ValueError("%s: give credits (a number of credits) or micro_credits, one of them" % what)
    if micro is not None:
        if isinstance(micro, bool) or not isinstance(micro, int) or micro < 0:
            raise ValueError("%s: micro_credits %r: want a non-negative integer" % (what, micro))
        return micro
    return micro_credits(credits)


# Money fields' deprecated names, which servers before v0.2 sent alone:
# the SDK fills in the new name from the old so callers read one name.
_OLD_MONEY = {"balance": "balance_micro_credits", "spent": "spent_micro_credits"}
_OLD_PRICES = {
    "train_per_1k": "train_micro_credits_per_1k",
    "prefill_per_1k": "prefill_micro_credits_per_1k",
    "sample_per_1k": "sample_micro_credits_per_1k",
    "storage_per_gb_hour": "storage_micro_credits_per_gb_hour",
}


def _money_names(v: Any, key: str = "") -> Any:
    if isinstance(v, list):
        for x in v:
            _money_names(x, key)
    elif isinstance(v, dict):
        old = dict(_OLD_MONEY)
        if key in ("cost", "charges"):
            old["credits"] = "micro_credits"
        if key == "prices":
            old.update(_OLD_PRICES)
        for o, n in old.items():
            if o in v and n not in v and isinstance(v[o], int):
                v[n] = v[o]
        for k, x in v.items():
            if isinstance(x, (dict, list)):
                _money_names(x, k)
    return v


def _drop_none(d: Json) -> Json:
    return {k: v for k, v in d.items() if v is not None}


def raw_cid(sha256_digest: bytes) -> str:
    """The CID Signal names stored bytes by: CIDv1, raw codec, sha2-256, base32."""
    b = bytes([0x01, 0x55, 0x12, 0x20]) + sha256_digest
    return "b" + base64.b32encode(b).decode("ascii").lower().rstrip("=")


class SignalClient:
    """A client of a Signal cluster's coordinators (any member of the raft cluster).

    ``api_key`` defaults to env ``SIGNAL_API_KEY``, ``base_url`` to env
    ``SIGNAL_URL``. ``base_url`` may name several coordinators of one
    cluster (a list, or comma-separated): a call that cannot reach one, or
    that one answers 503, goes on to the next, keeping its idempotency key,
    so a dead coordinator costs a reconnect and the call still runs (and is
    charged) once. Safe to share between threads.
    """

    def __init__(
        self,
        api_key: Optional[str] = None,
        base_url: Union[str, Sequence[str], None] = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        min_backoff: float = DEFAULT_MIN_BACKOFF_S,
        max_backoff: float = DEFAULT_MAX_BACKOFF_S,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        if api_key is None:
            api_key = os.environ.get("SIGNAL_API_KEY", "")
        if base_url is None:
            base_url = os.environ.get("SIGNAL_URL", "")
        urls = base_url.split(",") if isinstance(base_url, str) else list(base_url)
        urls = [x.strip() for x in urls if x and x.strip()]
        if not urls:
            raise ValueError("base_url is empty: pass base_url= or set SIGNAL_URL (e.g. http://127.0.0.1:8080)")
        self.base_urls: List[str] = []
        loopback = True
        for raw_url in urls:
            u = urllib.parse.urlsplit(raw_url)
            if u.scheme not in ("http", "https") or not u.netloc:
                raise ValueError("base_url %r: want http://host:port or https://host" % raw_url)
            path = u.path.rstrip("/")
            if path.endswith(API_PREFIX):
                path = path[: -len(API_PREFIX)]
            self.base_urls.append("%s://%s%s" % (u.scheme, u.netloc, path))
            loopback = loopback and _is_loopback(u.hostname or "")
        # The index in base_urls of the coordinator calls go to: the last
        # one that answered.
        self._cur = 0
        self._cur_lock = threading.Lock()
        if "\r" in api_key or "\n" in api_key:
            raise ValueError("api_key contains a line break")
        if max_retries < 0 or min_backoff < 0 or max_backoff < min_backoff:
            raise ValueError(
                "retries %r, backoff %r..%r: want retries >= 0 and 0 <= min <= max"
                % (max_retries, min_backoff, max_backoff)
            )
        if max_response_bytes <= 0:
            raise ValueError("max_response_bytes %r: want > 0" % max_response_bytes)
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.max_response_bytes = max_response_bytes
        if max_request_bytes <= 0:
            raise ValueError("max_request_bytes %r: want > 0" % max_request_bytes)
        self.max_request_bytes = max_request_bytes
        self.user_agent = "signal-python/%s" % __version__
        # A loopback testnet must not go through an HTTP proxy from the environment.
        handlers = [urllib.request.ProxyHandler({})] if loopback else []
        self._opener = urllib.request.build_opener(*handlers)
        self._sleep = time.sleep  # tests replace it to observe waits

    @property
    def base_url(self) -> str:
        """The coordinator calls go to now: the last one that answered."""
        return self.base_urls[self._cur]

    @classmethod
    def from_testnet(cls, path: Optional[str] = None, **kwargs: Any) -> "SignalClient":
        """A client of every coordinator of a local testnet, failing over between them.

        ``path`` is the ``testnet.json`` that ``signal testnet`` writes, or
        the testnet's directory; it defaults to env ``SIGNAL_TESTNET``.
        """
        path = path or os.environ.get("SIGNAL_TESTNET", "")
        if not path:
            raise ValueError("no testnet: pass its testnet.json or directory, or set SIGNAL_TESTNET")
        if os.path.isdir(path):
            path = os.path.join(path, "testnet.json")
        with open(path, encoding="utf-8") as f:
            tn = json.load(f)
        coords = tn.get("coordinators") or []
        if not coords or not tn.get("api_key"):
            raise ValueError("%s: want non-empty coordinators and api_key" % path)
        return cls(api_key=tn["api_key"], base_url=coords, **kwargs)

    # -- transport ---------------------------------------------------------

    def _request(self, method: str, path: str, body: Optional[Json] = None, token: Optional[str] = None) -> Any:
        """Sends one logical call, retrying 429/503 and refused connections."""
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode("utf-8")
        full_path = API_PREFIX + path
        if data is not None and len(data) > self.max_request_bytes:
            raise TooLargeError(
                "%s %s: request body of %d bytes is over the limit of %d bytes: "
                "split the batch into smaller calls" % (method, full_path, len(data), self.max_request_bytes),
                status=413,
                code="too_large",
                method=method,
                path=full_path,
            )
        headers = {"Accept": "application/json", "User-Agent": self.user_agent}
        if data is not None:
            headers["Content-Type"] = "application/json"
        tok = token if token else self.api_key
        if tok:
            headers["Authorization"] = "Bearer " + tok
        if method != "GET":
            # One key per logical call, reused by every retry.
            headers[IDEMPOTENCY_HEADER] = uuid.uuid4().hex
        attempt = 0
        # Coordinators that failed in a row: while some are untried, the
        # next is tried at once.
        tried = 0
        while True:
            attempt += 1
            cur = self._cur
            try:
                return self._attempt(self.base_urls[cur], method, full_path, data, headers)
            except SignalError as e:
                e.attempts = attempt
                conn = isinstance(e, SignalConnectionError) and getattr(e, "_conn", False)
                failover = len(self.base_urls) > 1 and (conn or e.status == 503)
                if failover:
                    with self._cur_lock:
                        if self._cur == cur:  # unless another call moved on already
                            self._cur = (cur + 1) % len(self.base_urls)
                # A connection never made is retried; one cut off mid-flight
                # only on another coordinator: its idempotency key makes that
                # safe, where the same one may still be running the call.
                retryable = e.temporary or failover or (
                    isinstance(e, SignalConnectionError) and getattr(e, "_refused", False)
                )
                if not retryable or attempt > self.max_retries:
                    raise
                tried += 1
                if failover and tried < len(self.base_urls):
                    continue
                tried = 0
                wait = e.retry_after if e.retry_after else self._backoff(attempt)
                self._sleep(min(wait, self.max_backoff))

    def _attempt(self, base_url: str, method: str, path: str, data: Optional[bytes], headers: Dict[str, str]) -> Any:
        req = urllib.request.Request(base_url + path, data=data, headers=headers, method=method)
        try:
            resp = self._opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            try:
                raw = e.read(_MAX_ERROR_BODY_BYTES)
            except OSError:
                raw = b""
            finally:
                e.close()
            raise self._api_error(e.code, e.headers, raw, method, path) from None
        except urllib.error.URLError as e:
            err = SignalConnectionError("cannot reach %s: %s" % (base_url, e.reason), method=method, path=path)
            # Only a connection never made is retried: the server cannot have
            # started the call.
            err._refused = isinstance(e.reason, ConnectionRefusedError)  # type: ignore[attr-defined]
            err._conn = isinstance(e.reason, ConnectionError)  # type: ignore[attr-defined]
            raise err from e
        except (socket.timeout, OSError) as e:
            err = SignalConnectionError("%s %s: %s" % (method, path, e), method=method, path=path)
            # A connection that broke (a coordinator that died mid-call), not
            # one that was slow.
            err._conn = isinstance(e, ConnectionError)  # type: ignore[attr-defined]
            raise err from e
        with resp:
            try:
                raw = resp.read(self.max_response_bytes + 1)
            except (socket.timeout, OSError) as e:
                err = SignalConnectionError("read response: %s" % e, method=method, path=path)
                err._conn = isinstance(e, ConnectionError)  # type: ignore[attr-defined]
                raise err from e
        if len(raw) > self.max_response_bytes:
            raise ResponseTooLargeError(
                "response over %d bytes" % self.max_response_bytes, method=method, path=path
            )
        if not raw.strip():
            return {}
        try:
            return _money_names(json.loads(raw))
        except ValueError as e:
            raise SignalError("decode response: %s" % e, status=resp.status, method=method, path=path) from e

    def _api_error(self, status: int, headers: Any, raw: bytes, method: str, path: str) -> SignalError:
        code, message = "", ""
        try:
            body = json.loads(raw)
            err = body.get("error") if isinstance(body, dict) else None
            if isinstance(err, dict) and isinstance(err.get("code"), str) and err["code"]:
                code, message = err["code"], str(err.get("message", ""))
        except ValueError:
            pass
        if not code:
            message = raw.decode("utf-8", "replace").strip()
            if len(message) > 200:
                message = message[:200] + "..."
        return error_from_response(
            status,
            code,
            message,
            request_id=headers.get(REQUEST_ID_HEADER) if headers else None,
            retry_after=_parse_retry_after(headers.get("Retry-After") if headers else None),
            method=method,
            path=path,
        )

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [min, min * 2**(attempt-1)], capped by max_backoff."""
        hi = min(self.min_backoff * (2 ** (attempt - 1)), self.max_backoff)
        if hi <= self.min_backoff:
            return self.min_backoff
        return random.uniform(self.min_backoff, hi)

    # -- calls -------------------------------------------------------------

    def health(self) -> Json:
        """GET /v1/health: status, whether this member leads raft, version."""
        return self._request("GET", "/health")

    def create_run(
        self,
        base_model: str,
        lora_rank: int = 32,
        *,
        lora_alpha: Optional[float] = None,
        target_modules: Optional[List[str]] = None,
        seed: Optional[int] = None,
        checkpoint_every: Optional[int] = None,
        lr_schedule: Optional[Json] = None,
        name: Optional[str] = None,
    ) -> "SignalRun":
        """Starts a training run (POST /v1/runs) and returns its handle."""
        if not base_model:
            raise ValueError("base_model is empty")
        body = _drop_none(
            {
                "base_model": base_model,
                "lora_rank": lora_rank,
                "lora_alpha": lora_alpha,
                "target_modules": target_modules,
                "seed": seed,
                "checkpoint_every": checkpoint_every,
                "lr_schedule": lr_schedule,
                "name": name,
            }
        )
        return SignalRun(self, self._request("POST", "/runs", body))

    def list_runs(self) -> List[Json]:
        """The caller's own runs."""
        return self._request("GET", "/runs").get("runs", [])

    def get_run(self, run_id: str) -> "SignalRun":
        """Fetches a run and returns its handle."""
        return SignalRun(self, self._request("GET", _run_path(run_id)))

    def run(self, run_id: str) -> "SignalRun":
        """A handle on an existing run, without fetching it."""
        _run_path(run_id)
        return SignalRun(self, {"id": run_id})

    def delete_run(self, run_id: str) -> Json:
        """Ends a run and frees its node's session; returns the ended run."""
        return self._request("DELETE", _run_path(run_id))

    def list_checkpoints(self, run_id: Optional[str] = None) -> List[Json]:
        """The checkpoints of one of your runs, or of all of them, newest first."""
        runs = [self._request("GET", _run_path(run_id))] if run_id else self.list_runs()
        cps = [cp for r in runs for cp in r.get("checkpoints") or []]
        return sorted(cps, key=lambda cp: cp.get("created_at", ""), reverse=True)

    def checkpoint_files(self, checkpoint: str) -> Json:
        """A checkpoint's files with signed download URLs (valid until ``expires``)."""
        if not checkpoint or any(c in checkpoint for c in "?#"):
            raise ValueError("checkpoint %r: give its id or URI" % (checkpoint,))
        return self._request("GET", "/checkpoints/" + urllib.parse.quote(checkpoint, safe="") + "/files")

    def download_checkpoint(self, checkpoint: str, out_dir: str) -> List[Json]:
        """Writes a checkpoint's files into ``out_dir`` through the coordinator,
        each checked against its CID (a file whose bytes do not match is
        removed and ``SignalError`` raised); needs no store credentials.
        Returns the files written."""
        files = self.checkpoint_files(checkpoint)["files"]
        os.makedirs(out_dir, exist_ok=True)
        for f in files:
            name = f["name"]
            if not name or os.path.basename(name) != name or name in (".", ".."):
                raise SignalError("checkpoint %s: file name %r is not a plain name: refused" % (checkpoint, name))
            dst = os.path.join(out_dir, name)
            h = hashlib.sha256()
            try:
                with urllib.request.urlopen(f["url"], timeout=self.timeout) as resp, open(dst, "wb") as out:
                    while True:
                        chunk = resp.read(1 << 20)
                        if not chunk:
                            break
                        h.update(chunk)
                        out.write(chunk)
            except (OSError, urllib.error.URLError) as e:
                if os.path.exists(dst):
                    os.remove(dst)
                raise SignalConnectionError("download %s of checkpoint %s: %s" % (name, checkpoint, e)) from e
            got = raw_cid(h.digest())
            if got != f["cid"]:
                os.remove(dst)
                raise SignalError("download %s of checkpoint %s: the bytes have CID %s, the checkpoint names %s" % (name, checkpoint, got, f["cid"]))
        return files

    def sampling_client(self, *, checkpoint: Optional[str] = None, base_model: Optional[str] = None) -> "SignalRun":
        """A run to sample one set of weights: a checkpoint's adapter (its run's
        base model and rank), or the base model alone (an untrained adapter
        leaves it as it is). Close it (or use ``with``) to free its session."""
        if checkpoint:
            src = next((r for r in self.list_runs() for cp in r.get("checkpoints") or [] if checkpoint in (cp.get("id"), cp.get("uri"))), None)
            if src is None:
                raise ValueError("checkpoint %r is not one of your runs'" % (checkpoint,))
            run = self.create_run(src["base_model"], lora_rank=src["lora_rank"], lora_alpha=src.get("lora_alpha"),
                                  target_modules=src.get("target_modules"), name="sampler")
            try:
                run.load_state(checkpoint)
            except SignalError:
                run.close()
                raise
            return run
        if not base_model:
            raise ValueError("give a checkpoint or a base_model to sample")
        return self.create_run(base_model, lora_rank=1, name="sampler")

    def run_metrics(self, run_id: str) -> List[Json]:
        """A run's per-step metrics."""
        return self._request("GET", _run_path(run_id, "/metrics")).get("metrics", [])

    def account(self) -> Json:
        """``balance_micro_credits``, ``spent_micro_credits`` and recent ``charges`` (each with ``micro_credits``)."""
        return self._request("GET", "/account")

    def models(self) -> List[Json]:
        """The base models the network serves, with prices."""
        return self._request("GET", "/models").get("models", [])

    def nodes(self) -> List[Json]:
        """Live nodes and their capacity."""
        return self._request("GET", "/nodes").get("nodes", [])

    def tokenize(self, base_model: str, text: str, add_special_tokens: bool = False) -> List[int]:
        """Token ids of text under a base model's tokenizer, computed by the server."""
        if not base_model:
            raise ValueError("base_model is empty")
        body: Json = {"base_model": base_model, "text": text}
        if add_special_tokens:
            body["add_special_tokens"] = True
        return self._request("POST", "/tokenize", body).get("tokens", [])

    def create_key(
        self,
        admin_token: str,
        credits: Union[int, float, str, decimal.Decimal, None] = None,
        name: Optional[str] = None,
        *,
        micro_credits: Optional[int] = None,
    ) -> Json:
        """Mints an API key for a new account funded with ``credits`` (admin).

        ``credits`` is a number of credits, as ``signal keys create --credits``
        takes it (``100``, ``0.5``); ``micro_credits`` gives the API's integer
        instead. (Before v0.2 ``credits`` was micro-credits.)
        """
        _need_admin(admin_token)
        mc = _amount(credits, micro_credits, "create_key")
        return self._request("POST", "/admin/keys", _drop_none({"micro_credits": mc, "name": name}), token=admin_token)

    def credit(
        self,
        admin_token: str,
        account: str,
        credits: Union[int, float, str, decimal.Decimal, None] = None,
        *,
        micro_credits: Optional[int] = None,
    ) -> Json:
        """Adds ``credits`` (a number of credits, or ``micro_credits``) to an account (admin).

        Returns ``{"account", "balance_micro_credits"}``. (Before v0.2 the
        third argument was ``amount``, in micro-credits.)
        """
        _need_admin(admin_token)
        mc = _amount(credits, micro_credits, "credit")
        return self._request("POST", "/admin/credit", {"account": account, "micro_credits": mc}, token=admin_token)

    def list_keys(self, admin_token: str, account: Optional[str] = None) -> List[Json]:
        """The API keys as ``{"id", "account", "name", "created_at"}`` (never the keys), of ``account`` alone when set (admin)."""
        _need_admin(admin_token)
        path = "/admin/keys" + ("?account=" + urllib.parse.quote(account, safe="") if account else "")
        return self._request("GET", path, token=admin_token).get("keys", [])

    def revoke_key(self, admin_token: str, key_id: str) -> Json:
        """Revokes the API key ``key_id`` names (``create_key``'s ``key_id``); its account and balance stay (admin)."""
        _need_admin(admin_token)
        if not key_id or any(c in key_id for c in "/?#"):
            raise ValueError("key id %r: want one path segment" % (key_id,))
        return self._request("DELETE", "/admin/keys/" + key_id, token=admin_token)

    def create_join_token(self, admin_token: str, operator_account: Optional[str] = None) -> Json:
        """Issues a token a node presents to join the network (admin)."""
        _need_admin(admin_token)
        body = _drop_none({"operator_account": operator_account})
        return self._request("POST", "/admin/join_tokens", body, token=admin_token)

    def push_checkpoint(
        self,
        checkpoint_id: str,
        repo: str,
        *,
        private: bool = True,
        token: Optional[str] = None,
        commit_message: Optional[str] = None,
    ) -> Json:
        """Pushes one of your checkpoints to a Hugging Face Hub model repository.

        The coordinator commits the checkpoint's PEFT files (read from the
        network's store, each verified by its CID) and a model card naming
        the base model, rank, steps and CIDs, creating ``repo``
        ("owner/name") if it does not exist (private unless
        ``private=False``). ``token`` (default ``$HF_TOKEN``) needs write
        access; it is used for this call only. A push that failed resumes
        when called again: files the Hub holds already are not sent twice.
        Returns ``{"checkpoint", "repo", "url", "commit_url", "commit_oid",
        "files"}``.
        """
        if not checkpoint_id or any(c in checkpoint_id for c in "/?#") or not checkpoint_id.isprintable():
            raise ValueError("checkpoint id %r: want a checkpoint's id" % (checkpoint_id,))
        if not repo:
            raise ValueError("repo is empty: name the Hub repository as owner/name")
        token = token or os.environ.get("HF_TOKEN")
        if not token:
            raise ValueError("no Hub token: pass token= or set HF_TOKEN to a token with write access to %s" % repo)
        body = _drop_none({"repo": repo, "private": bool(private), "token": token, "commit_message": commit_message})
        return self._request("POST", "/checkpoints/" + urllib.parse.quote(checkpoint_id, safe="") + "/push", body)


def _need_admin(token: str) -> None:
    if not token:
        raise ValueError("admin_token is empty")


def _adam_body(learning_rate: Optional[float] = None, **others: Optional[float]) -> Json:
    unknown = set(others) - {"beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"}
    if unknown:
        raise TypeError("unknown optim_step settings: %s" % ", ".join(sorted(unknown)))
    adam = _drop_none(dict(learning_rate=learning_rate, **others))
    return {"adam_params": adam} if adam else {}


def _run_path(run_id: str, suffix: str = "") -> str:
    if not run_id or any(c in run_id for c in "/?#") or run_id in (".", "..") or not run_id.isprintable():
        raise ValueError("run id %r: want one non-empty path segment" % (run_id,))
    return "/runs/" + urllib.parse.quote(run_id, safe="") + suffix


class SignalRun:
    """A handle on one training run; ``info`` is its last known state.

    Use it in a ``with`` block so that the run ends (its node session is
    freed and billing of its storage starts counting down) however the block
    ends::

        with client.create_run("signal-tiny", lora_rank=8) as run:
            run.forward_backward(["The cat sat on the mat."])
    """

    def __init__(self, client: SignalClient, info: Json) -> None:
        self.client = client
        self.info = info
        self._keep_open = False
        # One worker: the run's submitted calls run in submission order.
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._executor_lock = threading.Lock()

    def submit(self, method: str, *args: Any, **kwargs: Any) -> "concurrent.futures.Future[Any]":
        """Runs ``getattr(self, method)(*args, **kwargs)`` after every call
        submitted before it and returns its future at once: a loop prepares
        its next batch while the run works (``forward_backward_async`` and
        the others are this)."""
        fn = getattr(self, method)
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="signal-run")
            return self._executor.submit(fn, *args, **kwargs)

    def forward_backward_async(self, *args: Any, **kwargs: Any) -> "concurrent.futures.Future[Json]":
        """``forward_backward`` as a future, in submission order."""
        return self.submit("forward_backward", *args, **kwargs)

    def forward_async(self, *args: Any, **kwargs: Any) -> "concurrent.futures.Future[Json]":
        """``forward`` as a future, in submission order."""
        return self.submit("forward", *args, **kwargs)

    def optim_step_async(self, *args: Any, **kwargs: Any) -> "concurrent.futures.Future[Json]":
        """``optim_step`` as a future, in submission order."""
        return self.submit("optim_step", *args, **kwargs)

    def sample_async(self, *args: Any, **kwargs: Any) -> "concurrent.futures.Future[Json]":
        """``sample`` as a future, in submission order."""
        return self.submit("sample", *args, **kwargs)

    def train_step_async(self, *args: Any, **kwargs: Any) -> "concurrent.futures.Future[Tuple[Json, Json]]":
        """``train_step`` as a future, in submission order."""
        return self.submit("train_step", *args, **kwargs)

    def pipeline(self, calls: Sequence[Tuple[str, Json]]) -> List[Json]:
        """Sends ``(call, body)`` pairs for the run to make in order, in one
        round trip (forward, forward_backward, optim_step, sample,
        save_state; each body as that call's route takes it). Returns each
        call's answer. A retry of a lost answer is answered for the calls
        that ran and runs the rest; the first failure names its call."""
        if not calls:
            raise ValueError("calls is empty")
        out = self.client._request("POST", _run_path(self.id, "/pipeline"),
                                   {"calls": [{"call": c, "body": b} for c, b in calls]})
        results = out.get("results", [])
        for r in results:
            cost = r.get("cost") if isinstance(r, dict) else None
            if isinstance(cost, dict):
                spent = self.info.get("spent_micro_credits", 0) + int(cost.get("micro_credits", 0))
                self.info["spent_micro_credits"] = self.info["spent"] = spent
            if isinstance(r, dict) and "step" in r and "learning_rate" in r:
                self.info["step"] = r["step"]
        return results

    def train_step(
        self,
        batch: Optional[Iterable[BatchItem]] = None,
        learning_rate: Optional[float] = None,
        *,
        examples: Optional[Iterable[Json]] = None,
        loss_fn: Optional[str] = None,
        loss_fn_config: Optional[Json] = None,
        **adam: Optional[float],
    ) -> Tuple[Json, Json]:
        """One training step, forward_backward then optim_step, in one round
        trip; returns both answers. ``adam`` takes optim_step's other
        settings (beta1, beta2, eps, weight_decay, grad_clip_norm)."""
        fb = self._batch_body(batch, examples, loss_fn, loss_fn_config)
        res = self.pipeline([("forward_backward", fb), ("optim_step", _adam_body(learning_rate, **adam))])
        return res[0], res[1]

    def __repr__(self) -> str:
        return "SignalRun(id=%r, base_model=%r, status=%r, step=%r)" % (
            self.id,
            self.info.get("base_model"),
            self.info.get("status"),
            self.info.get("step"),
        )

    @property
    def id(self) -> str:
        return self.info["id"]

    @property
    def base_model(self) -> str:
        return self.info.get("base_model", "")

    @property
    def step(self) -> int:
        return int(self.info.get("step", 0))

    def _post(self, suffix: str, body: Json) -> Json:
        out = self.client._request("POST", _run_path(self.id, suffix), body)
        cost = out.get("cost") if isinstance(out, dict) else None
        if isinstance(cost, dict):
            spent = self.info.get("spent_micro_credits", 0) + int(cost.get("micro_credits", 0))
            self.info["spent_micro_credits"] = self.info["spent"] = spent
        return out

    @staticmethod
    def _batch_body(
        batch: Optional[Iterable[BatchItem]],
        examples: Optional[Iterable[Json]],
        loss_fn: Optional[str],
        loss_fn_config: Optional[Json],
    ) -> Json:
        data: List[Json] = []
        texts: List[Json] = list(examples or [])
        for i, item in enumerate(batch or []):
            if isinstance(item, str):
                texts.append({"text": item})
            elif isinstance(item, tuple) and len(item) == 2:
                texts.append({"prompt": item[0], "completion": item[1]})
            elif isinstance(item, dict) and "model_input" in item:
                data.append(item)
            elif isinstance(item, dict) and ("text" in item or "prompt" in item):
                texts.append(item)
            else:
                raise ValueError(
                    "batch item %d: want a Datum dict, a text example dict, a str or a (prompt, completion) pair, got %r"
                    % (i, type(item).__name__)
                )
        if data and texts:
            raise ValueError("batch mixes token Datum and text examples: send them in separate calls")
        if not data and not texts:
            raise ValueError("batch is empty")
        body: Json = {"data": data} if data else {"examples": texts}
        if loss_fn is not None:
            body["loss_fn"] = loss_fn
        if loss_fn_config is not None:
            body["loss_fn_config"] = loss_fn_config
        return body

    def forward_backward(
        self,
        batch: Optional[Iterable[BatchItem]] = None,
        *,
        examples: Optional[Iterable[Json]] = None,
        loss_fn: Optional[str] = None,
        loss_fn_config: Optional[Json] = None,
    ) -> Json:
        """Computes the loss on a batch and accumulates gradients for the next optim_step.

        ``batch`` holds token Datum dicts, or text: strings, (prompt, completion)
        pairs or ``{"text"}``/``{"prompt", "completion"}`` dicts, tokenized by the
        node with the run's tokenizer. Returns ``loss_sum``, ``loss_mean``,
        ``tokens``, ``grad_norm``, ``logprobs``, ``cost``, ``balance``.
        """
        return self._post("/forward_backward", self._batch_body(batch, examples, loss_fn, loss_fn_config))

    def forward(
        self,
        batch: Optional[Iterable[BatchItem]] = None,
        *,
        examples: Optional[Iterable[Json]] = None,
        loss_fn: Optional[str] = None,
        loss_fn_config: Optional[Json] = None,
    ) -> Json:
        """Like forward_backward without gradients: loss and logprobs only."""
        return self._post("/forward", self._batch_body(batch, examples, loss_fn, loss_fn_config))

    def optim_step(
        self,
        learning_rate: Optional[float] = None,
        *,
        beta1: Optional[float] = None,
        beta2: Optional[float] = None,
        eps: Optional[float] = None,
        weight_decay: Optional[float] = None,
        grad_clip_norm: Optional[float] = None,
    ) -> Json:
        """Applies the accumulated gradients with AdamW; unset values take the run's schedule and defaults."""
        body = _adam_body(learning_rate, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, grad_clip_norm=grad_clip_norm)
        out = self._post("/optim_step", body)
        if "step" in out:
            self.info["step"] = out["step"]
        return out

    def sample(
        self,
        prompts: Union[str, Sequence[int], Sequence[Union[str, Sequence[int], Json]]],
        max_tokens: int = 64,
        *,
        num_samples: int = 1,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        stop: Optional[List[str]] = None,
        seed: Optional[int] = None,
    ) -> Json:
        """Samples continuations with the run's adapter.

        ``prompts`` is a text, a token list, or a list of texts / token lists /
        Prompt dicts. Returns ``{"samples": [[Sample]], "cost", "balance"}``,
        one list of ``num_samples`` samples per prompt.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        items: List[Json] = []
        for i, p in enumerate(prompts):  # type: ignore[arg-type]
            if isinstance(p, str):
                items.append({"text": p})
            elif isinstance(p, dict):
                items.append(p)
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
                items.append({"tokens": list(p)})
            else:
                raise ValueError("prompt %d: want a str, a list of token ids or a Prompt dict" % i)
        if not items:
            raise ValueError("prompts is empty")
        params = _drop_none(
            {
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "stop": stop,
                "seed": seed,
            }
        )
        body: Json = {"prompts": items, "sampling_params": params}
        if num_samples != 1:
            body["num_samples"] = num_samples
        return self._post("/sample", body)

    def save_state(self, mode: str = "adapter", name: Optional[str] = None, push_to_hub: Optional[Json] = None) -> Json:
        """Stores the adapter ("adapter") or adapter + optimizer ("full"); returns ``{"checkpoint", "cost", "balance"}``.

        ``push_to_hub={"repo": "owner/name", "private": True, "token": ...}``
        then pushes the checkpoint to the Hugging Face Hub
        (:meth:`SignalClient.push_checkpoint`; the token defaults to
        ``$HF_TOKEN``) and adds the push's answer as ``"push"``.
        """
        if push_to_hub is not None:
            unknown = set(push_to_hub) - {"repo", "private", "token", "commit_message"}
            if unknown or not push_to_hub.get("repo"):
                raise ValueError("push_to_hub: want {\"repo\": \"owner/name\", \"private\"?, \"token\"?, \"commit_message\"?}")
            if not (push_to_hub.get("token") or os.environ.get("HF_TOKEN")):
                # Refused before the save, not after it.
                raise ValueError("push_to_hub: no token: give \"token\" or set HF_TOKEN")
        out = self._post("/save_state", _drop_none({"mode": mode, "name": name}))
        if push_to_hub is not None:
            out["push"] = self.client.push_checkpoint(
                out["checkpoint"]["id"],
                push_to_hub["repo"],
                private=push_to_hub.get("private", True),
                token=push_to_hub.get("token"),
                commit_message=push_to_hub.get("commit_message"),
            )
        return out

    def load_state(self, checkpoint: str) -> Json:
        """Restores the run from a checkpoint id, URI or CID; returns the run."""
        if not checkpoint:
            raise ValueError("checkpoint is empty")
        self.info = self.client._request("POST", _run_path(self.id, "/load_state"), {"checkpoint": checkpoint})
        return self.info

    def close(self) -> Json:
        """Ends the run and frees its node's session (after the calls already
        submitted); closing an ended run is a no-op."""
        with self._executor_lock:
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True)
        self.info = self.client.delete_run(self.id)
        return self.info

    def keep_open(self) -> None:
        """Leaves the run open when its ``with`` block ends, to go on with it later (``client.run(id)``)."""
        self._keep_open = True

    def __enter__(self) -> "SignalRun":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Ends the run when the ``with`` block ends, however it ends.

        A failure to end it is raised only when the block itself succeeded:
        the block's own exception is the one worth seeing.
        """
        if self._keep_open or self.info.get("status") == "ended":
            return
        try:
            self.close()
        except SignalError:
            if exc_type is None:
                raise

    def refresh(self) -> Json:
        """Fetches the run's current state into ``info``."""
        self.info = self.client._request("GET", _run_path(self.id))
        return self.info

    def metrics(self) -> List[Json]:
        """The run's per-step metrics."""
        return self.client.run_metrics(self.id)

    def tokenize(self, text: str, add_special_tokens: bool = False) -> List[int]:
        """Token ids of text under the run's base model tokenizer."""
        if not self.base_model:
            self.refresh()
        return self.client.tokenize(self.base_model, text, add_special_tokens)

    def datum_from_text(self, prompt: str, completion: str) -> Json:
        """A Datum training on ``completion`` after ``prompt``, tokenized by the server.

        The prompt is tokenized with the tokenizer's special tokens (e.g. BOS),
        the completion without; see :func:`datum_from_tokens`.
        """
        p = self.tokenize(prompt, add_special_tokens=True) if prompt else []
        c = self.tokenize(completion, add_special_tokens=not prompt)
        return datum_from_tokens(p, c)
