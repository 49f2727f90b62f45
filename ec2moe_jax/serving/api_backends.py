"""The backends of the OpenAI-compatible API (:mod:`.openai_api`): the whole model in this
process (:class:`LocalBackend`), or end clients of a cloud server (:class:`RemoteBackend`).
Each implements :class:`~.openai_api.Backend`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ec2moe_jax.serving.openai_api import ApiError, Sampling, Tokenizer


def _unsupported_top_p(sampling: Sampling, where: str) -> None:
    if sampling.top_p != 1.0:
        raise ApiError(400, f"top_p: {sampling.top_p} is not supported {where}: the sampler "
                            "(ec2moe_jax.models.generate.sample_token, the same on the cloud "
                            "server) draws from the full temperature-scaled distribution; "
                            "send top_p=1 or leave it out", "top_p")


class LocalBackend:
    """The whole model in this process (``ec2moe api`` without ``--cloud``): the KV-cache
    generation of ``ec2moe generate`` (:func:`ec2moe_jax.models.generate`), one request at a
    time. ``seed`` seeds the request's sampling key (None: a fresh random one), so a sampled
    request equals ``ec2moe generate --temperature T --seed S``.

    Args:
      model, params: the LM and its parameters.
      name: the model id clients send.
      tokenizer: text <-> ids (a trained workdir's :class:`~ec2moe_jax.data.ByteTokenizer`).
      plan: the plan record shown in responses (whole model here).
      chat_template: messages -> prompt ids (None: chat completions are refused).
      eos_ids: token ids that end a generation (an imported model's end of turn).
    """

    workers = 1

    def __init__(self, model, params, name: str, tokenizer: Tokenizer, plan: dict, *,
                 chat_template: Callable[[list[dict]], list[int]] | None = None,
                 eos_ids: tuple[int, ...] = ()):
        from ec2moe_jax.models import unstack_experts

        # One buffer per expert: decoding then reads the chosen experts without copying.
        self.model, self.params = model, unstack_experts(params)
        self.model_name, self.tokenizer = name, tokenizer
        self.vocab_size, self.max_seq_len = model.cfg.vocab_size, model.cfg.max_seq_len
        self.plan, self.chat_template, self.eos_ids = plan, chat_template, eos_ids

    def check(self, sampling: Sampling) -> None:
        _unsupported_top_p(sampling, "by the local model")

    def generate(self, prompt: list[int], max_new_tokens: int, sampling: Sampling,
                 on_token: Callable[[int], None], ext: dict) -> None:
        import secrets

        import jax
        import numpy as np

        from ec2moe_jax.models import generate

        ext.update(plan=self.plan, where="this process (the whole model)", bytes_up=0,
                   bytes_down=0)
        seed = secrets.randbits(31) if sampling.seed is None else sampling.seed
        generate(self.model, self.params, np.asarray([prompt], np.int32), max_new_tokens,
                 temperature=sampling.temperature, rng=jax.random.key(seed),
                 on_token=lambda t: on_token(int(np.asarray(t)[0])))

    def status(self) -> dict:
        return {"backend": "local", "plan": self.plan, "link": None}


class RemoteBackend:
    """End clients (:class:`~ec2moe_jax.serving.client.EndClient`) of one cloud server: one
    generation per client at a time (``workers = len(clients)``); the server batches them.

    Args:
      clients: connected end clients, each with its own session and plan.
      name, tokenizer: as :class:`LocalBackend`.
      address: the cloud server (for the status panel).
      describe: the plan record -> words (``ec2moe_jax.cli.infer.describe_plan``).
      replan: the re-planning hook of :meth:`EndClient.generate` (None: a fixed plan); it
        may switch the client's plan, and runs under a lock (one planner state).
      replan_every: tokens between re-planning checks.
    """

    chat_template = None
    eos_ids: tuple[int, ...] = ()  # trained byte models have no end-of-sequence token

    def __init__(self, clients: list, name: str, tokenizer: Tokenizer, *, address: str,
                 describe: Callable[[dict], str] | None = None,
                 replan: Callable[[Any], bool] | None = None, replan_every: int = 16):
        import queue

        if not clients:
            raise ValueError("RemoteBackend needs at least one end client")
        cfg = clients[0].cfg
        self.model_name, self.tokenizer, self.address = name, tokenizer, address
        self.vocab_size, self.max_seq_len = cfg.vocab_size, cfg.max_seq_len
        self.workers, self.describe = len(clients), describe
        self.pool: queue.Queue = queue.Queue()
        for c in clients:
            self.pool.put(c)
        self.current, self.replans = clients[0], 0
        self._replan, self.replan_every = replan, replan_every
        self._lock = threading.Lock()

    def check(self, sampling: Sampling) -> None:
        _unsupported_top_p(sampling, "with a cloud server")
        if sampling.seed is not None and sampling.temperature > 0:
            raise ApiError(400, f"seed: {sampling.seed} cannot be honoured with a cloud server: "
                                "the server samples every session from its own key (one per "
                                "server process, not per request); leave seed out, or use "
                                "temperature 0 (greedy)", "seed")

    def _replan_hook(self, client) -> bool:
        with self._lock:
            changed = self._replan(client)
        self.replans += bool(changed)
        return changed

    def plan_of(self, client) -> dict:
        """The client's current plan: split, resident experts per end layer, codec."""
        import numpy as np

        st, cfg = client.stages, client.cfg
        e, layers = cfg.moe.num_experts, cfg.num_layers
        resident = ([] if st.split == 0 else
                    np.asarray(st.end_extra["allowed"]).sum(-1)[:st.split].astype(int).tolist())
        plan = {"split": st.split, "layers": layers, "resident": resident,
                "codec": "token ids" if st.split == 0 else st.transport.name}
        if self.describe is not None:
            full = resident + [e] * (layers - st.split)
            codec = "bf16" if st.split == 0 else st.transport.name
            plan["text"] = self.describe({"split": st.split, "resident": full, "codec": codec})
        return plan

    def generate(self, prompt: list[int], max_new_tokens: int, sampling: Sampling,
                 on_token: Callable[[int], None], ext: dict) -> None:
        from ec2moe_jax.serving.client import ServingError

        c = self.pool.get()
        s = c.stats
        up, down, reconnects = s.bytes_up, s.bytes_down, s.reconnects
        try:
            c.temperature = sampling.temperature  # read when the session opens
            c.generate(prompt, max_new_tokens, on_token,
                       replan=None if self._replan is None else self._replan_hook,
                       replan_every=self.replan_every)
        except ServingError as e:
            raise ApiError(503, f"the cloud server {self.address}: {e}", kind="server_error",
                           code="cloud_unavailable") from None
        finally:
            self.current = c
            ext.update(plan=self.plan_of(c), where=f"end here, cloud at {self.address}",
                       bytes_up=s.bytes_up - up, bytes_down=s.bytes_down - down,
                       reconnects=s.reconnects - reconnects,
                       bytes_method="measured: protobuf bytes of the gRPC messages")
            self.pool.put(c)

    def status(self) -> dict:
        c = self.current
        s = c.stats
        link = {"rtt_s": s.rtt_s, "up_bps": s.up_bps, "server_queue_s": s.queue_s,
                "server_compute_s": s.compute_s, "end_step_s": s.end_s,
                "bytes_up": s.bytes_up, "bytes_down": s.bytes_down,
                "reconnects": s.reconnects,
                "method": "measured by the end client (EMA over replies)"}
        return {"backend": f"cloud {self.address}", "plan": self.plan_of(c), "link": link,
                "replans": self.replans}


class HFText:
    """An imported model's text (:class:`~ec2moe_jax.models.hf_tokenizer.HFTokenizer`) for
    the API: completions tokenize the prompt as plain text (OpenAI's completions take raw
    text), chat completions render the messages through the folder's chat template, as
    transformers' ``apply_chat_template`` with ``add_generation_prompt=True`` does.

    Raises (``chat``):
      ApiError: 400 when the template refuses the messages (its ``raise_exception``).
    """

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, chat=False)

    def decode(self, ids) -> str:
        return self.tok.decode(ids)

    def chat(self, messages: list[dict]) -> list[int]:
        import jinja2

        # The module's renderer is the one `ec2moe generate --hf` uses for one user turn.
        from ec2moe_jax.models.hf_tokenizer import _render

        msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            text = _render(self.tok.chat_template, msgs, self.tok.special)
        except jinja2.TemplateError as e:
            raise ApiError(400, f"messages: the model's chat template refused them: {e}",
                           "messages") from None
        return self.tok.tokenizer.encode(text, add_special_tokens=False).ids
