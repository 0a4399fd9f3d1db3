"""Write a tiny Llama and its byte-level BPE tokenizer as a GGUF file, as llama.cpp's converter would."""

import json

import numpy as np


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved for its rotary layout; transformers undoes this on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, model, tokenizer) -> None:
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), 'llama')
    w.add_name('tiny-llama')
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(cfg, 'rope_theta', None) or cfg.rope_parameters['rope_theta']))
    w.add_vocab_size(cfg.vocab_size)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state['model']['vocab']
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else ' '.join(m) for m in state['model']['merges']]
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre('default')
    w.add_token_list(tokens)
    special = set(tokenizer.all_special_ids)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_bos_token_id(tokenizer.eos_token_id)
    w.add_add_bos_token(False)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor('token_embd.weight', sd['model.embed_tokens.weight'])
    for i in range(cfg.num_hidden_layers):
        p = f'model.layers.{i}.'
        w.add_tensor(f'blk.{i}.attn_norm.weight', sd[p + 'input_layernorm.weight'])
        w.add_tensor(f'blk.{i}.attn_q.weight', _permute(sd[p + 'self_attn.q_proj.weight'], cfg.num_attention_heads))
        w.add_tensor(f'blk.{i}.attn_k.weight', _permute(sd[p + 'self_attn.k_proj.weight'], cfg.num_key_value_heads))
        w.add_tensor(f'blk.{i}.attn_v.weight', sd[p + 'self_attn.v_proj.weight'])
        w.add_tensor(f'blk.{i}.attn_output.weight', sd[p + 'self_attn.o_proj.weight'])
        w.add_tensor(f'blk.{i}.ffn_norm.weight', sd[p + 'post_attention_layernorm.weight'])
        w.add_tensor(f'blk.{i}.ffn_gate.weight', sd[p + 'mlp.gate_proj.weight'])
        w.add_tensor(f'blk.{i}.ffn_up.weight', sd[p + 'mlp.up_proj.weight'])
        w.add_tensor(f'blk.{i}.ffn_down.weight', sd[p + 'mlp.down_proj.weight'])
    w.add_tensor('output_norm.weight', sd['model.norm.weight'])
    if not cfg.tie_word_embeddings:
        w.add_tensor('output.weight', sd['lm_head.weight'])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
