"""The architecture suite of the PEFT-oracle tests (issue 18): tiny, seeded, random transformers
models built from config classes (never downloaded), and the seeded inputs that drive them.

Every model is built once per test session by `build_base` and saved with `save_pretrained`
(safetensors). The tests drive loramerge only through its command line; this module knows
nothing about loramerge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

VOCAB = 96
SEQ = 8
BATCH = 2
# token ids every token batch holds: the trainable-token rows and the aLoRA invocation sequence
TRAINABLE_TOKENS = [3, 5, 7]
INVOCATION = [9, 10]


@dataclass(frozen=True)
class Arch:
    """One architecture: how to build it tiny, load it back and feed it."""

    name: str
    family: str  # decoder | moe | encdec | encoder | vision | speech
    config_class: str
    kwargs: dict
    model_class: str
    auto_class: str
    inputs: str = "tokens"  # tokens | seq2seq | pixels | video | features | audio
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def config(self):
        import transformers

        return getattr(transformers, self.config_class)(**self.kwargs)

    def model_cls(self):
        import transformers

        return getattr(transformers, self.model_class)

    def auto_cls(self):
        import transformers

        return getattr(transformers, self.auto_class)


# kwargs shared by the llama-like families (names differ elsewhere)
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
HEAD8 = dict(LLAMA, head_dim=8)
MOE = dict(LLAMA, num_experts_per_tok=2)


def _causal(name, config_class, kwargs, model_class, notes=""):
    return Arch(name, "decoder", config_class, kwargs, model_class, "AutoModelForCausalLM",
                notes=notes)


def _moe(name, config_class, kwargs, model_class, notes=""):
    return Arch(name, "moe", config_class, kwargs, model_class, "AutoModelForCausalLM",
                notes=notes)


ARCHS: list[Arch] = [
    # decoder-only LMs
    _causal("llama", "LlamaConfig", LLAMA, "LlamaForCausalLM"),
    _causal("llama-tied", "LlamaConfig", dict(LLAMA, tie_word_embeddings=True),
            "LlamaForCausalLM"),
    _causal("mistral", "MistralConfig", HEAD8, "MistralForCausalLM"),
    _causal("qwen2", "Qwen2Config", LLAMA, "Qwen2ForCausalLM"),
    _causal("qwen3", "Qwen3Config", HEAD8, "Qwen3ForCausalLM"),
    _causal("gemma", "GemmaConfig", dict(HEAD8, tie_word_embeddings=True), "GemmaForCausalLM"),
    _causal("gemma2", "Gemma2Config", dict(HEAD8, tie_word_embeddings=True),
            "Gemma2ForCausalLM"),
    _causal("gemma3-text", "Gemma3TextConfig", dict(HEAD8, tie_word_embeddings=True),
            "Gemma3ForCausalLM"),
    _causal("phi", "PhiConfig", dict(LLAMA, partial_rotary_factor=0.5), "PhiForCausalLM"),
    _causal("phi3", "Phi3Config", LLAMA, "Phi3ForCausalLM"),
    _causal("gpt2", "GPT2Config",
            dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4),
            "GPT2LMHeadModel"),
    _causal("gpt2-square", "GPT2Config",
            dict(vocab_size=32, n_positions=64, n_embd=32, n_layer=1, n_head=4),
            "GPT2LMHeadModel", notes="vocab equals hidden size: lm_head is square"),
    _causal("llama-square", "LlamaConfig", dict(LLAMA, vocab_size=32, num_hidden_layers=1),
            "LlamaForCausalLM", notes="vocab equals hidden size: lm_head is square"),
    _causal("gpt-bigcode", "GPTBigCodeConfig",
            dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4),
            "GPTBigCodeForCausalLM"),
    _causal("gpt-neo", "GPTNeoConfig",
            dict(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32, num_layers=2,
                 num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8),
            "GPTNeoForCausalLM"),
    _causal("gpt-neox", "GPTNeoXConfig",
            dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64),
            "GPTNeoXForCausalLM"),
    _causal("gptj", "GPTJConfig",
            dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
            "GPTJForCausalLM"),
    _causal("codegen", "CodeGenConfig",
            dict(vocab_size=VOCAB, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4,
                 rotary_dim=4),
            "CodeGenForCausalLM"),
    _causal("bloom", "BloomConfig", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
            "BloomForCausalLM"),
    _causal("opt", "OPTConfig",
            dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32),
            "OPTForCausalLM"),
    _causal("falcon", "FalconConfig",
            dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64),
            "FalconForCausalLM"),
    _causal("mpt", "MptConfig",
            dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                 expansion_ratio=2),
            "MptForCausalLM"),
    _causal("starcoder2", "Starcoder2Config", LLAMA, "Starcoder2ForCausalLM"),
    _causal("olmo", "OlmoConfig", LLAMA, "OlmoForCausalLM"),
    _causal("olmo2", "Olmo2Config", LLAMA, "Olmo2ForCausalLM"),
    _causal("cohere", "CohereConfig", dict(LLAMA, tie_word_embeddings=True),
            "CohereForCausalLM"),
    _causal("stablelm", "StableLmConfig", LLAMA, "StableLmForCausalLM"),
    _causal("granite", "GraniteConfig", LLAMA, "GraniteForCausalLM"),
    _causal("persimmon", "PersimmonConfig",
            dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64),
            "PersimmonForCausalLM"),
    _causal("smollm3", "SmolLM3Config", LLAMA, "SmolLM3ForCausalLM"),
    _causal("helium", "HeliumConfig", HEAD8, "HeliumForCausalLM"),
    _causal("glm", "GlmConfig", HEAD8, "GlmForCausalLM"),
    _causal("xglm", "XGLMConfig",
            dict(vocab_size=VOCAB, d_model=32, ffn_dim=48, num_layers=2, attention_heads=4,
                 max_position_embeddings=64),
            "XGLMForCausalLM"),
    # mixture of experts
    _moe("mixtral", "MixtralConfig", dict(MOE, num_local_experts=4, head_dim=8),
         "MixtralForCausalLM"),
    _moe("qwen2-moe", "Qwen2MoeConfig",
         dict(MOE, num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=24),
         "Qwen2MoeForCausalLM"),
    _moe("qwen3-moe", "Qwen3MoeConfig",
         dict(MOE, num_experts=4, moe_intermediate_size=24, head_dim=8),
         "Qwen3MoeForCausalLM"),
    _moe("olmoe", "OlmoeConfig", dict(MOE, num_experts=4), "OlmoeForCausalLM"),
    _moe("granitemoe", "GraniteMoeConfig", dict(MOE, num_local_experts=4),
         "GraniteMoeForCausalLM"),
    _moe("phimoe", "PhimoeConfig", dict(MOE, num_local_experts=4), "PhimoeForCausalLM"),
    _moe("deepseek-v3", "DeepseekV3Config",
         dict(MOE, moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1,
              first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4,
              v_head_dim=8, qk_nope_head_dim=4, n_group=1, topk_group=1, num_key_value_heads=4),
         "DeepseekV3ForCausalLM"),
    # encoder-decoder
    Arch("t5", "encdec", "T5Config",
         dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
              num_heads=4, decoder_start_token_id=0),
         "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM", inputs="seq2seq"),
    Arch("bart", "encdec", "BartConfig",
         dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
              decoder_ffn_dim=48, max_position_embeddings=64),
         "BartForConditionalGeneration", "AutoModelForSeq2SeqLM", inputs="seq2seq"),
    Arch("whisper", "speech", "WhisperConfig",
         dict(vocab_size=VOCAB, num_mel_bins=8, encoder_layers=1, decoder_layers=1,
              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
              decoder_ffn_dim=48, d_model=32, max_source_positions=8, max_target_positions=16,
              decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              suppress_tokens=[], begin_suppress_tokens=[]),
         "WhisperForConditionalGeneration", "AutoModelForSpeechSeq2Seq", inputs="features"),
    # encoders with task heads
    Arch("bert-mlm", "encoder", "BertConfig",
         dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=64),
         "BertForMaskedLM", "AutoModelForMaskedLM"),
    Arch("bert-cls", "encoder", "BertConfig",
         dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=64, num_labels=3),
         "BertForSequenceClassification", "AutoModelForSequenceClassification"),
    Arch("roberta-cls", "encoder", "RobertaConfig",
         dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=72, num_labels=3, pad_token_id=1),
         "RobertaForSequenceClassification", "AutoModelForSequenceClassification"),
    Arch("distilbert-cls", "encoder", "DistilBertConfig",
         dict(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=48,
              max_position_embeddings=64, num_labels=3),
         "DistilBertForSequenceClassification", "AutoModelForSequenceClassification"),
    Arch("electra-cls", "encoder", "ElectraConfig",
         dict(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=1,
              num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
              num_labels=3),
         "ElectraForSequenceClassification", "AutoModelForSequenceClassification"),
    Arch("deberta-v2-cls", "encoder", "DebertaV2Config",
         dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=64, num_labels=3),
         "DebertaV2ForSequenceClassification", "AutoModelForSequenceClassification"),
    # vision
    Arch("vit", "vision", "ViTConfig",
         dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
              image_size=16, patch_size=4, num_labels=3),
         "ViTForImageClassification", "AutoModelForImageClassification", inputs="pixels"),
    Arch("resnet", "vision", "ResNetConfig",
         dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
              layer_type="basic"),
         "ResNetForImageClassification", "AutoModelForImageClassification", inputs="pixels"),
    Arch("videomae", "vision", "VideoMAEConfig",
         dict(image_size=16, patch_size=8, num_channels=3, num_frames=4, tubelet_size=2,
              hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
              num_labels=3),
         "VideoMAEForVideoClassification", "AutoModelForVideoClassification", inputs="video"),
    Arch("vivit", "vision", "VivitConfig",
         dict(image_size=16, num_frames=4, tubelet_size=[2, 8, 8], num_channels=3,
              hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
              num_labels=3),
         "VivitForVideoClassification", "AutoModelForVideoClassification", inputs="video"),
    # speech
    Arch("wav2vec2", "speech", "Wav2Vec2Config",
         dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
              intermediate_size=48, conv_dim=(16, 16), conv_stride=(4, 2), conv_kernel=(8, 4),
              num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
              apply_spec_augment=False),
         "Wav2Vec2ForCTC", "AutoModelForCTC", inputs="audio"),
    Arch("hubert", "speech", "HubertConfig",
         dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
              intermediate_size=48, conv_dim=(16, 16), conv_stride=(4, 2), conv_kernel=(8, 4),
              num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
              apply_spec_augment=False, feat_extract_norm="layer", conv_bias=True),
         "HubertForCTC", "AutoModelForCTC", inputs="audio"),
]
ARCH = {a.name: a for a in ARCHS}


# ---------------------------------------------------------------------------------------------
# The PEFT option matrix


@dataclass(frozen=True)
class Case:
    """One PEFT adapter on one architecture.

    `merge`, `convert`: what loramerge does: "exact" (equal PEFT's live forward) or "refuse"
    (exits non-zero, the error naming one of `needles`; `notes` says why, for the docs).
    """

    arch: str
    option: str
    lora: dict
    merge: str = "exact"
    convert: str = "exact"
    needles: tuple[str, ...] = ()
    bf16: bool = False  # also merged into a bf16 base and checked bit for bit
    pissa_convert: bool = False  # saved with path_initial_model_for_weight_conversion
    seeded_load: bool = False  # PEFT's load is randomised: seed torch before every load
    notes: str = ""

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.option}"


R = dict(r=4, lora_alpha=8)
ALL_LINEAR = dict(R, target_modules="all-linear")

# architectures whose plain case targets something other than all-linear
PLAIN_TARGETS = {
    "resnet": dict(R, target_modules=["convolution"]),  # Conv2d everywhere, head excluded
    # PEFT's all-linear wraps PhiMoE's router (an nn.Linear whose forward returns a tuple) and
    # then fails in forward: attention only
    "phimoe": dict(R, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    # PEFT's all-linear asks get_input_embeddings(), which Wav2Vec2 does not implement
    "hubert": dict(R, target_modules=["q_proj", "v_proj", "feature_projection.projection"]),
    "wav2vec2": dict(R, target_modules=["q_proj", "k_proj", "v_proj", "out_proj",
                                        "intermediate_dense", "output_dense"]),
}
BF16_PLAIN = {"llama", "gpt2", "qwen2", "vit", "t5", "mixtral", "wav2vec2", "bert-cls"}


def _plain_cases() -> list[Case]:
    return [
        Case(a.name, "plain", PLAIN_TARGETS.get(a.name, ALL_LINEAR), bf16=a.name in BF16_PLAIN)
        for a in ARCHS
    ]


MOE_EXPERTS = {
    "mixtral": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "qwen2-moe": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "qwen3-moe": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "olmoe": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "granitemoe": ["block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj"],
    "phimoe": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "deepseek-v3": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
}
ROUTERS = {
    "mixtral": ["mlp.gate.weight"],  # on disk: block_sparse_moe.gate.weight
    "phimoe": ["mlp.router.weight"],  # on disk: block_sparse_moe.gate.weight
    "granitemoe": ["block_sparse_moe.router.weight"],  # on disk: ...router.layer.weight
}

BDLORA = dict(target_modules_bd_a=["o_proj", "down_proj"],
              target_modules_bd_b=["q_proj", "k_proj", "v_proj", "up_proj", "gate_proj"],
              nblocks=2)

OPTION_CASES: list[Case] = [
    # explicit targets including output heads and task heads
    Case("llama", "head", dict(R, target_modules=["q_proj", "v_proj", "lm_head"])),
    Case("llama-tied", "head", dict(R, target_modules=["q_proj", "lm_head"]),
         notes="LoRA on a tied lm_head: the output must be untied"),
    Case("bart", "head", dict(R, target_modules=["q_proj", "lm_head"])),
    Case("gpt-neox", "head", dict(R, target_modules=["query_key_value", "lm_head"]),
         notes="in memory lm_head, on disk embed_out"),
    Case("t5", "head", dict(R, target_modules=["q", "v", "lm_head"])),
    Case("bert-cls", "head", dict(R, target_modules=["query", "value", "classifier"])),
    Case("vit", "head", dict(R, target_modules=["q_proj", "classifier"])),
    Case("whisper", "head", dict(R, target_modules=["q_proj", "proj_out"]),
         notes="proj_out is tied to decoder.embed_tokens and not stored in the files"),
    Case("bert-mlm", "head", dict(R, target_modules=["query", "cls.predictions.decoder"]),
         notes="cls.predictions.decoder is tied to the word embeddings"),
    # GPT-2 Conv1D: square attn.c_proj next to the Linear lm_head
    Case("gpt2", "cproj-head", dict(R, target_modules=["attn.c_proj", "lm_head"])),
    Case("gpt2-square", "head", dict(R, target_modules=["lm_head"])),
    Case("gpt2-square", "cproj-head", dict(R, target_modules=["attn.c_proj", "lm_head"])),
    Case("llama-square", "head", dict(R, target_modules=["lm_head"])),
    # embedding LoRA on tied embeddings
    Case("llama-tied", "embed", dict(R, target_modules=["embed_tokens", "q_proj"])),
    Case("gemma", "embed", dict(R, target_modules=["embed_tokens"])),
    Case("gpt2", "embed", dict(R, target_modules=["wte", "c_attn"])),
    Case("whisper", "embed", dict(R, target_modules=["embed_tokens"]),
         notes="decoder.embed_tokens is tied to proj_out"),
    Case("bert-mlm", "embed", dict(R, target_modules=["word_embeddings"]),
         notes="word_embeddings are tied to cls.predictions.decoder"),
    Case("t5", "embed", dict(R, target_modules=["shared"]),
         notes="T5's shared table feeds encoder, decoder and (tied) lm_head"),
    # DoRA (Linear, Conv1D, embedding)
    Case("llama", "dora", dict(ALL_LINEAR, use_dora=True), bf16=True),
    Case("gpt2", "dora", dict(ALL_LINEAR, use_dora=True)),
    Case("bert-cls", "dora", dict(R, target_modules=["query", "value", "dense"], use_dora=True)),
    Case("llama-tied", "dora-embed", dict(R, target_modules=["embed_tokens"], use_dora=True)),
    Case("gpt2", "dora-embed", dict(R, target_modules=["wte", "c_fc"], use_dora=True)),
    # rsLoRA with per-module ranks and alphas
    Case("llama", "rslora-patterns",
         dict(ALL_LINEAR, use_rslora=True, rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
              alpha_pattern={"v_proj": 3, "o_proj": 16}), bf16=True),
    Case("t5", "rslora-patterns",
         dict(ALL_LINEAR, use_rslora=True, rank_pattern={"q": 2}, alpha_pattern={"wo": 5})),
    Case("qwen2-moe", "rslora-patterns",
         dict(ALL_LINEAR, use_rslora=True, rank_pattern={"shared_expert.up_proj": 2},
              alpha_pattern={"k_proj": 2})),
    # trained biases
    Case("qwen2", "bias-all", dict(ALL_LINEAR, bias="all")),
    Case("bert-cls", "bias-all", dict(R, target_modules=["query", "value"], bias="all")),
    Case("gpt2", "bias-all", dict(R, target_modules=["c_attn"], bias="all")),
    Case("qwen2", "bias-lora-only", dict(ALL_LINEAR, bias="lora_only")),
    Case("bert-cls", "bias-lora-only", dict(R, target_modules=["query", "value"],
                                            bias="lora_only")),
    Case("qwen2", "lora-bias", dict(R, target_modules=["q_proj", "k_proj", "v_proj"],
                                    lora_bias=True), bf16=True),
    Case("llama", "lora-bias", dict(ALL_LINEAR, lora_bias=True), merge="refuse",
         needles=("bias",), notes="Llama's layers have no bias: the merged model cannot hold "
         "the LoRA bias"),
    Case("bert-cls", "lora-bias", dict(R, target_modules=["query", "value"], lora_bias=True)),
    # modules_to_save: nested heads and whole heads
    Case("roberta-cls", "modules-to-save",
         dict(R, target_modules=["query", "value"],
              modules_to_save=["classifier.dense", "classifier.out_proj"]),
         notes="nested head: classifier.dense and classifier.out_proj"),
    Case("bert-cls", "modules-to-save",
         dict(R, target_modules=["query", "value"], modules_to_save=["classifier"])),
    Case("vit", "modules-to-save",
         dict(R, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])),
    # trainable tokens (rows of the embedding, and of a tied head)
    Case("llama", "trainable-tokens",
         dict(R, target_modules=["q_proj"], trainable_token_indices=TRAINABLE_TOKENS)),
    Case("llama-tied", "trainable-tokens",
         dict(R, target_modules=["q_proj"], trainable_token_indices=TRAINABLE_TOKENS)),
    Case("gemma", "trainable-tokens",
         dict(R, target_modules=["q_proj"], trainable_token_indices=TRAINABLE_TOKENS)),
    # LoRA on 3-D expert parameters, and on routers (in-memory name differs from the file's)
    *[Case(arch, "experts", dict(R, target_modules=[], target_parameters=params),
           bf16=arch == "mixtral")
      for arch, params in MOE_EXPERTS.items()],
    *[Case(arch, "router", dict(R, target_modules=["q_proj"], target_parameters=params))
      for arch, params in ROUTERS.items()],
    # convolutions: nn.Conv1d (wav2vec2 feature extractor, Whisper), Conv2d, Conv3d
    Case("wav2vec2", "conv1d", dict(R, target_modules=["conv_layers.0.conv", "conv_layers.1.conv",
                                                       "q_proj"]), bf16=True),
    # (not Whisper's conv1/conv2: its encoder reads conv.stride, which PEFT's wrapper hides)
    Case("hubert", "conv1d", dict(R, target_modules=["conv_layers.0.conv", "k_proj"])),
    Case("vit", "conv2d", dict(R, target_modules=["projection", "q_proj"])),
    Case("resnet", "conv2d", dict(R, target_modules=["convolution"], use_dora=True,
                                  modules_to_save=["classifier"])),
    Case("videomae", "conv3d", dict(R, target_modules=["projection", "query"])),
    Case("vivit", "conv3d", dict(R, target_modules=["projection", "query"])),
    # initialisations that change the base: saved as is, and converted by PEFT
    Case("llama", "pissa", dict(ALL_LINEAR, init_lora_weights="pissa")),
    Case("gpt2", "pissa", dict(ALL_LINEAR, init_lora_weights="pissa")),
    Case("llama", "pissa-converted", dict(ALL_LINEAR, init_lora_weights="pissa"),
         pissa_convert=True),
    Case("bert-cls", "pissa-converted", dict(R, target_modules=["query", "value"],
                                             init_lora_weights="pissa"), pissa_convert=True),
    Case("llama", "pissa-niter", dict(ALL_LINEAR, init_lora_weights="pissa_niter_2"),
         merge="refuse", needles=("pissa", "random", "niter"), seeded_load=True,
         notes="fast SVD: PEFT's load draws random numbers, the residual base is not reproducible"),
    Case("qwen2", "pissa-niter", dict(R, target_modules=["q_proj", "o_proj"],
                                      init_lora_weights="pissa_niter_1"),
         merge="refuse", needles=("pissa", "random", "niter"), seeded_load=True,
         notes="fast SVD: PEFT's load draws random numbers, the residual base is not reproducible"),
    Case("llama", "olora", dict(ALL_LINEAR, init_lora_weights="olora")),
    Case("qwen2", "olora", dict(ALL_LINEAR, init_lora_weights="olora")),
    Case("llama", "olora-converted", dict(ALL_LINEAR, init_lora_weights="olora"),
         pissa_convert=True),
    Case("qwen2", "olora-converted", dict(ALL_LINEAR, init_lora_weights="olora"),
         pissa_convert=True),
    # aLoRA: active only from the invocation tokens on, cannot be merged
    Case("llama", "alora", dict(R, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                alora_invocation_tokens=INVOCATION),
         merge="refuse", needles=("alora", "invocation", "activated"),
         notes="active only from the invocation tokens on: no weight computes that"),
    Case("qwen2", "alora", dict(R, target_modules=["q_proj", "k_proj", "v_proj"],
                                task_type="CAUSAL_LM", alora_invocation_tokens=INVOCATION),
         merge="refuse", needles=("alora", "invocation", "activated")),
    # layer replication
    Case("llama", "layer-replication", dict(ALL_LINEAR, layer_replication=[[0, 2], [1, 2]]),
         merge="refuse", needles=("layer_replication", "replicat"),
         notes="PEFT's forward runs copies of base layers, each with its own LoRA"),
    Case("mistral", "layer-replication", dict(ALL_LINEAR, layer_replication=[[0, 1], [0, 2]]),
         merge="refuse", needles=("layer_replication", "replicat")),
    # BD-LoRA and KaSA
    Case("llama", "bdlora", dict(ALL_LINEAR, use_bdlora=BDLORA)),
    Case("qwen2", "bdlora", dict(ALL_LINEAR, use_bdlora=BDLORA)),
    Case("llama", "kasa", dict(R, target_modules=["q_proj", "v_proj", "down_proj"],
                               kasa_config={})),
    Case("qwen2", "kasa", dict(R, target_modules=["q_proj", "o_proj"], kasa_config={})),
]

CASES: list[Case] = _plain_cases() + OPTION_CASES
CASE = {c.id: c for c in CASES}
assert len(CASE) == len(CASES), "case ids must be unique"





def token_ids(vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Random ids from 11 up (below are pad/bos/eos of some families and the special ids),
    with the trainable tokens in front and the aLoRA invocation in the middle."""
    ids = torch.randint(11, vocab, (BATCH, SEQ), generator=gen)
    ids[:, 0:3] = torch.tensor(TRAINABLE_TOKENS)
    ids[:, 4:6] = torch.tensor(INVOCATION)
    return ids


def make_inputs(arch: Arch, config) -> dict[str, torch.Tensor]:
    """Seeded inputs for one forward pass (the same on every call)."""
    gen = torch.Generator().manual_seed(1234)
    vocab = getattr(config, "vocab_size", VOCAB) or VOCAB
    if arch.inputs == "tokens":
        return {"input_ids": token_ids(vocab, gen)}
    if arch.inputs == "seq2seq":
        return {
            "input_ids": token_ids(vocab, gen),
            "decoder_input_ids": torch.randint(3, vocab, (BATCH, SEQ // 2), generator=gen),
        }
    if arch.inputs == "features":
        frames = 2 * config.max_source_positions
        return {
            "input_features": torch.randn(BATCH, config.num_mel_bins, frames, generator=gen),
            "decoder_input_ids": torch.randint(3, vocab, (BATCH, SEQ // 2), generator=gen),
        }
    if arch.inputs == "pixels":
        size = config.image_size if hasattr(config, "image_size") else 16
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(BATCH, channels, size, size, generator=gen)}
    if arch.inputs == "video":
        shape = (BATCH, config.num_frames, config.num_channels, config.image_size,
                 config.image_size)
        return {"pixel_values": torch.randn(*shape, generator=gen)}
    if arch.inputs == "audio":
        return {"input_values": torch.randn(BATCH, 400, generator=gen)}
    raise ValueError(arch.inputs)


def build_model(arch: Arch, seed: int = 0):
    """The tiny random float32 model, weights drawn from a seeded generator."""
    torch.manual_seed(seed)
    config = arch.config()
    model = arch.model_cls()(config).eval()
    # re-draw every floating parameter with the seed (init schemes of some families leave
    # zeros or ones, e.g. norms, LoRA-irrelevant but a zero weight hides layout bugs)
    gen = torch.Generator().manual_seed(seed + 17)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dtype.is_floating_point:
                scale = 0.2 if param.dim() > 1 else 0.05
                noise = torch.randn(param.shape, generator=gen) * scale
                # 1-D weights are norm scales: keep them near one
                one = param.dim() == 1 and name.endswith("weight")
                param.copy_(noise + (1.0 if one else 0.0))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def save_base(arch: Arch, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    model = build_model(arch)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def forward(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits.float()


Builder = Callable[[Arch, Path], Path]


def lora_config(case: Case):
    from peft import LoraConfig

    return LoraConfig(**case.lora)


def perturb(model, seed: int, scale: float = 0.05) -> int:
    """Make the adapter non-trivial as training would: add seeded noise to every trainable
    parameter (LoRA factors, DoRA magnitudes, trained biases, modules_to_save copies, trainable
    token rows). Returns how many tensors were changed."""
    gen = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * scale)
                changed += 1
    return changed


def build_adapter(case: Case, base_dir: Path, out_dir: Path) -> Path:
    """Apply the case's LoRA with PEFT's own `get_peft_model` on the float32 base, perturb every
    trainable parameter with seeded noise, and `save_pretrained` it."""
    from peft import get_peft_model

    arch = ARCH[case.arch]
    torch.manual_seed(7)  # PEFT's initialisers draw from the global generator
    model = arch.model_cls().from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, lora_config(case))
    initial = out_dir.parent / f"{out_dir.name.replace('.', '_')}_initial"
    if case.pissa_convert:
        # PEFT's recipe: the initial adapter is saved before training with init_lora_weights=True
        config = peft_model.peft_config["default"]
        init = config.init_lora_weights
        config.init_lora_weights = True
        peft_model.save_pretrained(initial)
        config.init_lora_weights = init
    assert perturb(peft_model, seed=len(case.id)) > 0, f"{case.id}: nothing is trainable"
    if case.pissa_convert:
        peft_model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=str(initial))
    else:
        peft_model.save_pretrained(out_dir)
    return out_dir
