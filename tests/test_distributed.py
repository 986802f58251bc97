"""A converted model trains under DDP and FSDP2 (gloo, 2 processes on the CPU): gradients are
identical across ranks, and the converted op ran on each rank."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager",
                      use_cache=False)
    return LlamaForCausalLM(cfg)


def _worker(rank, world, port, mode, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import attnswap

        x = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        model = attnswap.convert(_tiny_llama().train(), "sas", {"input_ids": x}, init="random",
                                 strict=True)
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)
        attnswap.reset_call_counts()
        data = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(10 + rank))
        wrapped(input_ids=data, labels=data).loss.backward()
        grads = []
        for n, p in model.named_parameters():
            g = p.grad
            if hasattr(g, "full_tensor"):
                g = g.full_tensor()
            grads.append((n, g.detach().clone()))
        gathered = [None] * world
        dist.all_gather_object(gathered, grads)
        same = all(torch.equal(a, b) for (_, a), (_, b) in zip(gathered[0], gathered[1]))
        sas = sum(1 for n, g in grads if ".attnswap." in n and g.abs().sum() > 0)
        queue.put((rank, same, attnswap.total_calls("softmax"), sas))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_converted_model_trains_under_data_parallel(mode):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, mode, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = sorted(queue.get(timeout=10) for _ in procs)
    for rank, same, calls, sas in results:
        assert same, f"rank {rank}: gradients differ across ranks"
        assert calls >= 2, f"rank {rank}: the converted op ran {calls} times"
        assert sas > 0, f"rank {rank}: SAS parameters got no gradient"
