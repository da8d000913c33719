"""Plain ROME, the way ``kmeng01/rome`` computes it, for tests and the benchmark.

Everything here goes through the Hugging Face model and forward hooks, one
unbatched forward per key (ROME's ``compute_u``: "TODO batch this"), a full
forward of every prompt at every Adam step with logits at every position
(``compute_v``), and ``torch.inverse`` of C (``get_inv_cov``), in float64.
It shares only the tokenised rows with :mod:`kncore.rome.edit`, so a test
that compares the two checks the runtime, the cached-prefix optimisation and
the update formula, not the tokenisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.base import get_module
from .editing import Request, _Rows, _vec_dtype, build_rows


def _mlp_module(lm, layer):
    return get_module(lm.model, lm.adapter.layer_module_name(layer, "mlp"))


@torch.no_grad()
def keys_ref(lm, layer: int, rows: list[tuple[list, int]]):
    """(down-projection input, MLP output) at one position per row, one HF forward each."""
    acts, outs = [], []
    store = {}
    down, mlp = lm.adapter.down_module(layer), _mlp_module(lm, layer)
    hs = [down.register_forward_pre_hook(lambda m, i: store.__setitem__("in", i[0])),
          mlp.register_forward_hook(lambda m, i, o: store.__setitem__("out", o))]
    try:
        for ids, p in rows:
            lm.model(torch.tensor([ids], device=lm.device))
            acts.append(store["in"][0, p])
            outs.append(store["out"][0, p])
    finally:
        for h in hs:
            h.remove()
    return torch.stack(acts), torch.stack(outs)


def left_ref(k_star: torch.Tensor, C: torch.Tensor | None) -> torch.Tensor:
    """ROME's ``compute_u`` tail: ``u = inverse(C) @ k*`` (or k*), normalised, in float64."""
    u = k_star.double()
    if C is not None:
        u = torch.inverse(C.double()) @ u
    return u / u.norm()


def _block_out(out):
    return out[0] if isinstance(out, tuple) else out


def delta_ref(lm, layer: int, rows: _Rows, hparams, init: str = "mlp"):
    """ROME's ``compute_v`` optimisation: ``(delta, v_init, losses)``.

    ``init="mlp"``: ROME's, delta added to the MLP module's output (where a
    norm follows the MLP, as Gemma-2's post-feedforward norm, the residual
    stream changes by that norm of the sum). ``init="layer"``: MEMIT's
    ``compute_z``, delta added to the layer's (block's) output, which is also
    the initial value for the clamp and the weight decay. The two places are
    the same residual change wherever the MLP output enters the residual
    stream as it is (GPT-2, GPT-J, LLaMA, GPT-NeoX), not behind a norm."""
    dev = lm.device
    b = lm.batch_ids(rows.ids)
    B, T = b.input_ids.shape
    nt = len(rows.target)
    targets = torch.full((rows.n_rewrite, T), -100, dtype=torch.long, device=dev)
    for i in range(rows.n_rewrite):
        p = rows.prompt_len[i]
        targets[i, p - 1: p - 1 + nt] = torch.tensor(rows.target, device=dev)
    vd = _vec_dtype(lm)
    delta = torch.zeros(lm.d_model, dtype=vd, device=dev, requires_grad=True)
    state = {"v_init": None}
    look = rows.lookup

    def hook(m, i, out):
        o = _block_out(out)
        if state["v_init"] is None:  # the first forward, whose delta is still zero
            state["v_init"] = o[0, look[0]].detach().clone()
        add = torch.zeros_like(o)
        add[torch.arange(B, device=dev), torch.tensor(look, device=dev)] = 1
        o = o + add * delta.to(o.dtype)
        return (o,) + tuple(out[1:]) if isinstance(out, tuple) else o

    if init not in ("mlp", "layer"):
        raise ValueError(f"init must be 'mlp' or 'layer', got {init!r}")
    where = _mlp_module(lm, layer) if init == "mlp" else get_module(lm.model, lm.adapter.layer_module_name(layer))
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    kl_init = None
    losses = []
    h = where.register_forward_hook(hook)
    try:
        for it in range(hparams.v_num_grad_steps):
            opt.zero_grad()
            logits = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask.long()).logits
            kl_logits = torch.stack([logits[i, look[i]] for i in range(rows.n_rewrite, B)])
            kl_lp = kl_logits.to(vd).log_softmax(-1)
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            lp = logits[: rows.n_rewrite].to(vd).log_softmax(-1)
            tok = lp.gather(2, torch.where(targets != -100, targets, 0)[..., None])[..., 0]
            nll_each = -(tok * (targets != -100)).sum(1) / nt
            nll = nll_each.mean()
            kl = hparams.kl_factor * F.kl_div(kl_init, kl_lp, log_target=True, reduction="batchmean")
            v_init = state["v_init"]
            wd = hparams.v_weight_decay * (delta.norm() / v_init.norm().to(vd) ** 2)
            loss = nll + kl + wd
            losses.append(float(loss.detach()))
            if losses[-1] < hparams.early_stop_loss or it == hparams.v_num_grad_steps - 1:
                break
            loss.backward()
            opt.step()
            max_norm = hparams.clamp_norm_factor * v_init.norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    finally:
        h.remove()
    return delta.detach(), state["v_init"].to(vd), losses


def update_ref(lm, layer: int, req: Request, rows: _Rows, hparams, C=None):
    """ROME's (left, right) for one request at one layer, without applying it.
    ``rows`` come from :func:`kncore.rome.edit.build_rows` on the same templates."""
    if hparams.fact_token == "last":
        key_rows = [(rows.ids[0][: rows.prompt_len[0]], rows.lookup[0])]
    else:
        key_rows = [(rows.ids[i][: rows.prompt_len[i]], rows.lookup[i]) for i in range(rows.n_rewrite)]
    acts, outs = keys_ref(lm, layer, key_rows)
    k_star = acts.double().mean(0)
    left = left_ref(k_star, C if hparams.mom2_adjustment else None)
    delta, v_init, losses = delta_ref(lm, layer, rows, hparams)
    target = v_init.double() + delta.double()
    if hparams.enable_random_prefix_keys:
        key, value = k_star, outs.double().mean(0)
    else:
        key, value = acts[0].double(), outs[0].double()
    right = (target - value) / torch.dot(key, left)
    return {"left": left, "right": right, "k_star": k_star, "delta": delta, "v_init": v_init, "losses": losses}


# -- MEMIT / EMMET -----------------------------------------------------------------------

@torch.no_grad()
def _key_and_block_out(lm, layer: int, z_layer: int, ids: list, p: int):
    """Down-projection input at ``layer`` and block output of ``z_layer`` at position p, one HF forward."""
    store = {}
    hs = [lm.adapter.down_module(layer).register_forward_pre_hook(lambda m, i: store.__setitem__("k", i[0])),
          get_module(lm.model, lm.adapter.layer_module_name(z_layer)).register_forward_hook(
              lambda m, i, o: store.__setitem__("z", _block_out(o)))]
    try:
        lm.model(torch.tensor([ids], device=lm.device))
    finally:
        for h in hs:
            h.remove()
    return store["k"][0, p].double(), store["z"][0, p].double()


def memit_ref(lm, requests: list[Request], hparams, C_by_layer: dict, templates: list[str], groups: list[int],
              method: str = "MEMIT", z: torch.Tensor | None = None) -> dict:
    """MEMIT's ``execute_memit`` (or EMMET's update) line by line: z per request
    by :func:`delta_ref` (full forwards), keys one forward per template,
    ``torch.linalg.solve`` / ``torch.inverse`` in float64, each layer's update
    added to W before the next layer's keys are read. W is restored at the end.
    ``z`` [d_model, B]: given targets instead of delta_ref's (the update step
    alone, on the same z as the code it checks).
    Returns ``{"z": [d_model, B], "updates": {layer: [d_model, d_ff]}, "keys", "resid"}``."""
    layers = sorted(hparams.layers)
    zL = layers[-1]
    zs, all_rows = [], []
    for r in requests:
        rows = build_rows(lm, r, templates, hparams.fact_token, hparams.kl_prompts)
        all_rows.append(rows)
        if z is None:
            delta, init, _ = delta_ref(lm, zL, rows, hparams, init="layer")
            zs.append(init.double() + delta.double())
    Z = torch.stack(zs, 1) if z is None else z.double()
    out = {"z": Z, "updates": {}, "keys": {}, "resid": {}}
    saved = {}
    try:
        for i, L in enumerate(layers):
            ks, cur = [], []
            for rows in all_rows:
                per = [_key_and_block_out(lm, L, zL, rows.ids[t][: rows.prompt_len[t]], rows.lookup[t])
                       for t in range(rows.n_rewrite)]
                start, means = 0, []
                for g in groups:  # MEMIT's compute_ks: mean per template group, then over groups
                    means.append(torch.stack([k for k, _ in per[start:start + g]]).mean(0))
                    start += g
                ks.append(torch.stack(means).mean(0))
                cur.append(per[0][1])  # template "{}": the bare prompt
            K = torch.stack(ks, 1)
            targets = Z - torch.stack(cur, 1)
            C = C_by_layer[L].double() if C_by_layer.get(L) is not None else torch.eye(K.shape[0], dtype=K.dtype)
            cov = hparams.mom2_update_weight * C
            if method == "MEMIT":
                adj_k = torch.linalg.solve(cov + K @ K.T, K)
            else:
                cov = cov + hparams.update_norm_lambda * torch.eye(cov.shape[0], dtype=cov.dtype)
                C_inv = torch.inverse(cov)
                D = K.T @ C_inv @ K + hparams.emmet_lambda * torch.eye(K.shape[1], dtype=K.dtype)
                adj_k = (torch.inverse(D) @ K.T @ C_inv).T
            resid = targets / (len(layers) - i)
            upd = resid @ adj_k.T  # [d_model, d_ff]
            W = lm.adapter.down_module(L).weight
            saved.setdefault(L, W.detach().clone())
            with torch.no_grad():
                W.copy_((W.double() + (upd if upd.shape == W.shape else upd.T)).to(W.dtype))
            out["updates"][L], out["keys"][L], out["resid"][L] = upd, K, targets
    finally:
        with torch.no_grad():
            for L, W0 in saved.items():
                lm.adapter.down_module(L).weight.copy_(W0)
    return out
