"""Structured pruning: FLAP (fluctuation-based, with bias compensation), Wanda-sp, and Self-Pruner.

Contract: these methods make every decoder layer physically smaller by
removing whole KV groups (a KV head with all its query heads: rows of q/k/v,
columns of o_proj) and MLP channels (rows of gate/up, columns of down_proj),
so any engine runs the result faster. Modules:

    stats      streaming mean / variance of the inputs of o_proj and down_proj
    scoring    metrics (ifv, wifv, wifn, wanda) and standardized unit scores
    planning   structures (al-am, ul-um, layer-rates) -> what each layer keeps
    surgery    physical removal through the model adapter, bias compensation
    flap       the whole-model prune (one-shot or sequential) and its report
    fitness    perplexity of a pruning plan without changing the model
    search     Self-Pruner's evolutionary search (logged, resumable)
    llm        the LLM operators over an OpenAI-compatible endpoint
    selfprune  search + final prune
    recipe     typed recipes; job: load, prune, save, report
"""
