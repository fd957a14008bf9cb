"""A spawned child for tests/test_memory.py: the peak memory of one training step (forward, loss,
backward) of a LoRA model under each trainer option, measured as the trainer measures (tuned
allocator, exact peak RSS), without a whole training run's start-up per option."""


def step_peaks(cases: list, q) -> None:
    """For each (model folder, cross_entropy, checkpointing, batch, seq_len): RSS growth over one step, bytes."""
    import gc

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from qeval.models.memory import PhasePeaks, own_weights, tune_allocator
    from qeval.train.loss import causal_lm_loss
    from qeval.train.spec import AdapterSpec, lora_config

    tune_allocator()
    out = []
    for model_dir, ce, ckpt, batch, seq in cases:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        own_weights(model)
        if ckpt:  # as qeval.train.recipe prepares a LoRA model
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        for p in model.parameters():
            p.requires_grad_(False)
        if ckpt:
            model.enable_input_require_grads()
        net = get_peft_model(model, lora_config(AdapterSpec()))
        net.train()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
        causal_lm_loss(net, ids[:, :16], ids[:, :16], ce).backward()  # lazy library state, outside the peak
        net.zero_grad(set_to_none=True)
        phases = PhasePeaks("cpu")
        with phases.phase("step"):
            causal_lm_loss(net, ids, ids, ce).backward()
        out.append(phases.peak["step"] - phases.start["step"])
        del net, model
        gc.collect()
    q.put(out)
