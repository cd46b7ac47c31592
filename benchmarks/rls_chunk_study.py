"""Whether recursive least squares can run chunk by chunk in float32 as accurately as its token loop (CPU).

RLS's token loop (generated/rls/naive.py) takes, per token, u = P k, beta = 1/(k^T u + a) with a = e^g, and
    S <- S + beta u (v - S^T k)^T,    P <- (P - beta u u^T) / a.
With A_t the product of a over a chunk's first t tokens, Q_t = A_t P_t and w_t = Q_(t-1) k_t = A_(t-1) u_t the
recursion is Q_t = Q_(t-1) - gamma_t w_t w_t^T with gamma_t = 1/(k_t^T w_t + A_t): no division by a decay inside
the chunk. Over a chunk of C tokens every w_t is a combination of the columns of M = Q_0 K^T, W = M T^T, with T
unit lower triangular; T's rows come one after another from G = K Q_0 K^T (C x C):
    T_t = e_t - sum_(s<t) gamma_s (T G)_(s,t) T_s,    gamma_t = 1 / ((T G)_(t,t) + A_t),
the token loop's own arithmetic on C-vectors instead of K x K matrices. The errors E = T (V - K S_0) (each token's
value minus the memory's read of its key just before it), the outputs S_0^T q_t + sum_(s<=t) gamma_s (w_s . q_t) e_s,
and the chunk's end S_0 + W diag(gamma) E, P = (Q_0 - W diag(gamma) W^T) / A_C follow from products. P is
symmetrised at every chunk's end: left as rounding makes it, its asymmetry grows from chunk to chunk until it
diverges (the "P as is" rows).

This script runs that chunked form in float32 (PyTorch, batched over sequences and heads) against naive_rls in
float64, next to the token loop in float32, for several chunk sizes and forgetting rates, and prints the largest
errors relative to the largest reference value.

    python benchmarks/rls_chunk_study.py [--out FILE] [--T 512] [--chunks 8 16 32 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from delta_family_gpu import teller  # noqa: E402  (this folder is on sys.path when a script here runs)
from generated.rls.naive import naive_rls  # noqa: E402


def chunked_rls(q, k, v, g, scale, state, C: int, symmetrise: bool = True):
    """RLS over chunks of C tokens (T a multiple of C) in q's dtype: (o, (S, P)); P symmetrised at every chunk's
    end unless told not to."""
    B, T, H, K = q.shape
    S, P = (x.to(q.dtype) for x in state)
    heads = lambda x: x.transpose(1, 2)  # noqa: E731  [B, T, H, ...] -> [B, H, T, ...]
    q, k, v, g = heads(q) * scale, heads(k), heads(v), heads(g)
    outputs = []
    eye = torch.eye(C, dtype=q.dtype)
    for start in range(0, T, C):
        rows = slice(start, start + C)
        Kc, Vc, Qc = k[:, :, rows], v[:, :, rows], q[:, :, rows]
        A = torch.exp(torch.cumsum(g[:, :, rows], -1))  # [B, H, C]: A_t, t = 1 .. C
        M = P @ Kc.transpose(-1, -2)  # [B, H, K, C]: Q_0 k_t
        G = Kc @ M  # [B, H, C, C]: k_s^T Q_0 k_t
        T_rows = torch.zeros(B, H, C, C, dtype=q.dtype)
        gamma = torch.zeros(B, H, C, dtype=q.dtype)
        for t in range(C):  # T's rows one after another
            reads = T_rows[..., :t, :] @ G[..., :, t:t + 1]  # [B, H, t, 1]: w_s . k_t for s < t
            row = eye[t] - ((gamma[..., :t, None] * reads) * T_rows[..., :t, :]).sum(-2)
            T_rows[..., t, :] = row
            gamma[..., t] = 1 / ((row * G[..., :, t]).sum(-1) + A[..., t])
        W = M @ T_rows.transpose(-1, -2)  # [B, H, K, C]: w_t
        # Each error depends on the ones before it through the same coefficients (unit lower triangular L).
        reads = W.transpose(-1, -2) @ Kc.transpose(-1, -2)  # [B, H, C, C]: (s, t) -> w_s . k_t
        L = torch.tril(reads.transpose(-1, -2) * gamma[..., None, :], -1)  # (t, s) -> gamma_s w_s . k_t, s < t
        E = torch.linalg.solve_triangular(eye + L, Vc - Kc @ S, upper=False, unitriangular=True)
        scores = torch.tril((Qc @ W) * gamma[..., None, :])  # (t, s) -> gamma_s w_s . q_t, s <= t
        outputs.append(Qc @ S + scores @ E)
        S = S + (W * gamma[..., None, :]) @ E
        P = (P - (W * gamma[..., None, :]) @ W.transpose(-1, -2)) / A[..., -1, None, None]
        if symmetrise:
            P = 0.5 * (P + P.transpose(-1, -2))
    return torch.cat(outputs, 2).transpose(1, 2), (S, P)


def problem(B: int, T: int, H: int, D: int, forget: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g, dtype=torch.float64), dim=-1)
            for _ in "qk")
    v = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    log_decay = -forget * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    S0 = 0.1 * torch.randn(B, H, D, D, generator=g, dtype=torch.float64)
    P0 = torch.eye(D, dtype=torch.float64).expand(B, H, D, D).clone()
    return (q, k, v, log_decay), (S0, P0)


def relative(found, reference) -> float:
    return ((found.double() - reference).abs().max() / reference.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--T", type=int, default=512)
    parser.add_argument("--chunks", nargs="*", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--forgets", nargs="*", type=float, default=[0.0, 0.02, 0.1, 0.2])
    args = parser.parse_args()
    say = teller(args.out)
    B, H, D = 2, 2, 64
    say(f"RLS in float32 against naive_rls in float64: B={B} H={H} K=V={D} T={args.T}, log-decays uniform in "
        "[-forget, 0], unit-norm keys; the largest error relative to the largest reference value")
    say(f"{'form':16s} {'forget':>7s} {'output':>9s} {'final S':>9s} {'final P':>9s}")
    for forget in args.forgets:
        inputs, state = problem(B, args.T, H, D, forget)
        o_ref, (S_ref, P_ref) = naive_rls(*inputs, initial_state=state, output_final_state=True)
        single = [x.float() for x in inputs]
        o, (S, P) = naive_rls(*single, initial_state=tuple(s.float() for s in state), output_final_state=True)
        say(f"{'token loop':16s} {forget:7.2f} {relative(o, o_ref):9.2e} {relative(S, S_ref):9.2e} "
            f"{relative(P, P_ref):9.2e}")
        for C in args.chunks:
            o, (S, P) = chunked_rls(*single, D ** -0.5, state, C)
            say(f"{f'chunks of {C}':16s} {forget:7.2f} {relative(o, o_ref):9.2e} {relative(S, S_ref):9.2e} "
                f"{relative(P, P_ref):9.2e}")
        o, (S, P) = chunked_rls(*single, D ** -0.5, state, 16, symmetrise=False)
        say(f"{'16, P as is':16s} {forget:7.2f} {relative(o, o_ref):9.2e} {relative(S, S_ref):9.2e} "
            f"{relative(P, P_ref):9.2e}  (chunks of 16, P not symmetrised)")
        o, (S, P) = chunked_rls(*inputs, D ** -0.5, state, args.chunks[-1])
        say(f"{'float64 chunks':16s} {forget:7.2f} {relative(o, o_ref):9.2e} {relative(S, S_ref):9.2e} "
            f"{relative(P, P_ref):9.2e}  (the algebra: chunks of {args.chunks[-1]} in float64)")


if __name__ == "__main__":
    main()
