"""Every CUDA kernel of the ops once, on tiny shapes, for compute-sanitizer (memcheck, racecheck):

    compute-sanitizer --tool memcheck --error-exitcode 99 python benchmarks/sanitize_ops.py

Runs both paths (16-byte and generic) of qk_norm_rope forward / backward / in-place qkv, apply_rope forward /
backward, apply_rope_vision on the towers' views (16-byte, 8-byte and generic lanes, forward and backward), the
cos/sin gather (16-byte, exact rows, scalar), in bf16 and fp32, neox and GPT-J, vision_position_ids' device path,
and the fused rope_index kernel (both conventions, time scaling, packed rows), and checks each result against the
CPU so a kernel that wrote nothing cannot pass (the vision rotation bit for bit). Exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys

import torch

import ropekit
from ropekit import ops

EPS = 1e-6
# --device cpu runs the same script on the CPU kernels (a dry run of the script itself, no GPU needed)
DEV = torch.device(sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda")
failures = []


def close(name, gpu, cpu, rtol):
    for a, b in zip(gpu, cpu):
        if not torch.allclose(a.float().cpu(), b.float(), rtol=rtol, atol=1e-3):
            failures.append(name)
            print("MISMATCH", name, (a.float().cpu() - b.float()).abs().max().item(), flush=True)
            return
    print("ok", name, flush=True)


def unaligned(x):
    flat = torch.empty(x.numel() + 8, dtype=x.dtype, device=x.device)  # 2 bytes (bf16) / 4 (fp32) off alignment
    view = flat[1: 1 + x.numel()].view(x.shape)
    view.copy_(x)
    return view


def main():
    # --shared-memory-only: the kernels that use shared memory or cross-block tickets (racecheck's subject): the
    # qk_norm_rope backward and its weight-gradient sum.
    smem_only = "--shared-memory-only" in sys.argv
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        rtol = 2 ** -6 if dtype == torch.bfloat16 else 1e-5
        for is_neox in (True, False):
            for head_dim, rot_dim in ((128, 128), (64, 32), (36, 20)):
                b, s, h, hk = 2, 3, 3, 1
                q = torch.randn(b, s, h * head_dim, generator=gen).to(dtype)
                k = torch.randn(b, s, hk * head_dim, generator=gen).to(dtype)
                qw = (torch.randn(head_dim, generator=gen) * 0.1 + 1).to(dtype)
                kw = (torch.randn(head_dim, generator=gen) * 0.1 + 1).to(dtype)
                cos = torch.randn(b, s, rot_dim, generator=gen).to(dtype)
                sin = torch.randn(b, s, rot_dim, generator=gen).to(dtype)
                gq = torch.randn(b, h, s, head_dim, generator=gen).to(dtype)
                gk = torch.randn(b, hk, s, head_dim, generator=gen).to(dtype)
                tag = f"{dtype} neox={is_neox} D{head_dim} R{rot_dim}"
                if smem_only:
                    cpu_b = torch.ops.ropekit.qk_norm_rope_backward(gq, gk, q, k, qw, kw, cos, sin, EPS, False,
                                                                    is_neox)
                    dev = [t.to(DEV) for t in (q, k, qw, kw, cos, sin, gq, gk)]
                    for layout, (qd, kd) in (("aligned", dev[:2]), ("unaligned", (unaligned(dev[0]),
                                                                                   unaligned(dev[1])))):
                        close(f"qk_norm_rope bwd {tag} {layout}",
                              torch.ops.ropekit.qk_norm_rope_backward(dev[6], dev[7], qd, kd, *dev[2:6], EPS, False,
                                                                      is_neox), cpu_b, max(rtol, 1e-4))
                    continue
                cpu_f = ops.qk_norm_rope(q, k, qw, kw, cos, sin, EPS, is_neox=is_neox)
                cpu_b = torch.ops.ropekit.qk_norm_rope_backward(gq, gk, q, k, qw, kw, cos, sin, EPS, False, is_neox)
                dev = [t.to(DEV) for t in (q, k, qw, kw, cos, sin, gq, gk)]
                for layout, (qd, kd) in (("aligned", dev[:2]), ("unaligned", (unaligned(dev[0]), unaligned(dev[1])))):
                    args = (qd, kd, *dev[2:6])
                    close(f"qk_norm_rope fwd {tag} {layout}", ops.qk_norm_rope(*args, EPS, is_neox=is_neox), cpu_f,
                          rtol)
                    close(f"qk_norm_rope bwd {tag} {layout}",
                          torch.ops.ropekit.qk_norm_rope_backward(dev[6], dev[7], *args, EPS, False, is_neox),
                          cpu_b, max(rtol, 1e-4))
                qkv = torch.cat([q, k, torch.randn(b, s, hk * head_dim, generator=gen).to(dtype)], -1)
                expect = qkv.clone()
                ops.qk_norm_rope_qkv_(expect, qw, kw, cos, sin, EPS, h, hk, is_neox=is_neox)
                got = qkv.to(DEV)
                ops.qk_norm_rope_qkv_(got, *dev[2:6], EPS, h, hk, is_neox=is_neox)
                close(f"qk_norm_rope_qkv_ {tag}", [got], [expect], rtol)
                q4, k4 = q.view(b, s, h, head_dim).transpose(1, 2), k.view(b, s, hk, head_dim).transpose(1, 2)
                cpu_r = ops.apply_rope(q4, k4, cos, sin, is_neox=is_neox)
                cpu_rb = torch.ops.ropekit.apply_rope_backward(gq, gk, cos, sin, 1, dtype, is_neox)
                for layout, conv in (("aligned", lambda t: t.to(DEV)), ("unaligned", lambda t: unaligned(t.to(DEV)))):
                    close(f"apply_rope fwd {tag} {layout}",
                          ops.apply_rope(conv(q4), conv(k4), cos.to(DEV), sin.to(DEV), is_neox=is_neox), cpu_r, rtol)
                    close(f"apply_rope bwd {tag} {layout}",
                          torch.ops.ropekit.apply_rope_backward(conv(gq), conv(gk), cos.to(DEV), sin.to(DEV), 1, dtype,
                                                                is_neox), cpu_rb, rtol)
    # gather: 16-byte path, exact rows (past the table, negative, stale column), scalar path (fp64, odd half)
    for half in () if smem_only else (64, 12):
        inv = 1.0 / (1e6 ** (torch.arange(0, 2 * half, 2).float() / (2 * half)))
        now = inv.clone()
        now[1] *= 1.5
        pos = torch.randint(0, 48, (3, 2, 5), generator=gen)
        pos[:, 0, 0] = torch.tensor([100, -3, 47])
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            for interleaved, is_neox, section in ((True, True, [half // 4, half // 4, half // 4]),
                                                  (False, False, [half // 2, half // 4, half // 4])):
                tables = ops.rope_cache(inv, 48)
                tag = f"gather half{half} {dtype} interleaved={interleaved} neox={is_neox}"
                cpu = ops.mrope_cos_sin(*tables, pos, section, dtype, now, 1.0, inv, mrope_interleaved=interleaved,
                                        is_neox=is_neox)
                gpu = ops.mrope_cos_sin(*[t.to(DEV) for t in tables], pos.to(DEV), section, dtype, now.to(DEV), 1.0,
                                        inv.to(DEV), mrope_interleaved=interleaved, is_neox=is_neox)
                close(tag, gpu, cpu, 1e-6)
    # apply_rope_vision on the towers' strided q/k views, forward and backward: bf16 takes 16-byte lanes at D 80,
    # 8-byte lanes at D 72 and the generic path at D 36; fp32 16-byte lanes at D 80 and 72, 8-byte lanes at D 36;
    # and vision_position_ids' sync-free device path (its two launches)
    for head_dim in () if smem_only else (80, 72, 36, 34):
        for dtype in (torch.bfloat16, torch.float32):
            n, h = 11, 3
            qkv = torch.randn(n, 3 * h * head_dim, generator=gen).to(dtype)
            q, k, _ = qkv.reshape(n, 3, h, head_dim).permute(1, 0, 2, 3).unbind(0)
            cos, sin = torch.randn(n, head_dim, generator=gen), torch.randn(n, head_dim, generator=gen)
            grads = [torch.randn(n, h, head_dim, generator=gen).to(dtype) for _ in range(2)]
            tag = f"apply_rope_vision {dtype} D{head_dim}"

            def run(device, q=q, k=k, cos=cos, sin=sin, grads=grads):
                qd, kd = (q.to(device).requires_grad_(), k.to(device).requires_grad_()) if device == "cpu" else \
                    [t.detach().requires_grad_() for t in qkv.to(device).reshape(n, 3, h, head_dim)
                     .permute(1, 0, 2, 3).unbind(0)[:2]]
                out = ops.apply_rope_vision(qd, kd, cos.to(device), sin.to(device))
                torch.autograd.backward(out, [g.to(device) for g in grads])
                return [o.detach() for o in out] + [qd.grad, kd.grad]

            close(tag, run(DEV), run("cpu"), 0)
    if not smem_only:
        grid = torch.tensor([[1, 4, 6], [3, 2, 2], [1, 8, 4]])
        n = int(grid.prod(-1).sum())
        close("vision_position_ids device path", [ops.vision_position_ids(grid.to(DEV), 2, n)],
              [ops.vision_position_ids(grid, 2)], 0)
    # rope_index: the fused kernel (count and index launches) on both conventions, packed rows, time scaling
    if not smem_only:
        ids = torch.tensor([[1, 7, 9, 9, 9, 9, 6, 5, 7, 8, 8, 8, 8, 6], [0, 0, 7, 8, 8, 8, 8, 6, 1, 2, 7, 9, 9, 6]])
        mask = torch.tensor([[1] * 14, [0, 0] + [1] * 12])
        types = torch.where(ids == 9, 1, torch.where(ids == 8, 2, 0))
        images, videos = torch.tensor([[1, 4, 4], [1, 2, 4]]), torch.tensor([[2, 4, 4]])
        for convention, kwargs in (("token_types", dict(mm_token_type_ids=types)),
                                   ("vision_start", dict()),
                                   ("token_types", dict(mm_token_type_ids=types, video_frames=False,
                                                        second_per_grid_ts=torch.tensor([0.5, 2.0]),
                                                        tokens_per_second=4)),
                                   ("token_types", dict(mm_token_type_ids=types, packed=True))):
            kw = dict(spatial_merge_size=2, image_token_id=9, video_token_id=8, vision_start_token_id=7,
                      convention=convention, **kwargs)
            grid_v = videos if kwargs.get("video_frames", True) else torch.tensor([[2, 2, 4], [1, 4, 4]])
            seg = torch.tensor([[1] * 7 + [2] * 7, [0, 0] + [1] * 6 + [2] * 6]) if kwargs.get("packed") else mask
            try:
                cpu = ropekit.rope_index(ids, images, grid_v, seg, on_host=True, **kw)
            except ValueError as e:  # an input without a result would end the CUDA context: skip it here
                print("skip rope_index", convention, kwargs.keys(), e, flush=True)
                continue
            moved = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            gpu = ropekit.rope_index(ids.to(DEV), images.to(DEV), grid_v.to(DEV), seg.to(DEV), on_host=False, **moved)
            ok = all(torch.equal(a.cpu(), b) for a, b in zip(gpu, cpu))
            print("ok" if ok else "MISMATCH", "rope_index", convention, sorted(kwargs), flush=True)
            if not ok:
                failures.append(f"rope_index {convention}")
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    print(f"{len(failures)} mismatches", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
