"""Typed dataclass schemas: the single source of truth for every knob.

Each group is stored in Hydra's ConfigStore as ``base_<group>`` (see ``store.py``); the YAML files
under ``conf/`` only pick and tweak these defaults. Attribute docstrings document each field.
Fields with a fixed set of values are Enums from ``choices.py`` (checked while Hydra composes).
Each group checks its own fields in ``validate()``; rules that involve several groups live in
``validate.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trainrun.config.blend import parse_blend, parse_split
from trainrun.config.checks import coerce_choices, in_range, optional_positive, positive
from trainrun.config.choices import (
    ActivationCheckpointing,
    CompileScope,
    Device,
    ExitSignal,
    LogLevel,
    Mlp,
    Norm,
    OptimizerImpl,
    PipelineSchedule,
    Position,
    Precision,
    RopeScaling,
    StdlibSubset,
    Verify,
    WandbMode,
)
from trainrun.errors import ConfigError


@dataclass
class RunConfig:
    """Run-wide settings."""

    seed: int = 1234
    """Seed for model init, data order and sampling; each rank derives its own from it."""
    dry_run: bool = False
    """Build the model on the meta device, print size/FLOPs/memory estimates and exit 0."""
    device: Device = Device.auto
    """auto (cuda if available, else cpu), cpu or cuda."""
    plugins: list[str] = field(default_factory=list)
    """Python modules imported before the run so that they can register components."""
    deterministic: bool = True
    """Ask torch for deterministic kernels (bit-exact resume on CPU)."""
    device_memory_gib: float | None = None
    """Memory of one accelerator in GiB (e.g. 80 for an H100): a sweep's pre-flight refuses points whose
    estimated training memory per device exceeds it; null: not checked."""

    def __post_init__(self) -> None:
        coerce_choices(self, "run")

    def validate(self) -> None:
        """A positive device memory; plugins are module names (importing them is the registry's job)."""
        optional_positive("run.device_memory_gib", self.device_memory_gib)
        for module in self.plugins:
            if not module or not all(part.isidentifier() for part in module.split(".")):
                raise ConfigError("run.plugins", module, "must be importable module names such as my_pkg.components")


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling for a context longer than pre-training's (Llama 3.1's ``rope_scaling``)."""

    type: RopeScaling = RopeScaling.none
    """none (plain RoPE) or llama3 (Llama 3.1: long wavelengths stretched by factor, short ones kept, those
    between blended; transformers' rope_type llama3)."""
    factor: float = 8.0
    """How much longer the context is than original_max_position_embeddings (Llama 3.1: 8)."""
    low_freq_factor: float = 1.0
    """Wavelengths above original_max_position_embeddings/low_freq_factor are divided by factor (Llama 3.1: 1)."""
    high_freq_factor: float = 4.0
    """Wavelengths below original_max_position_embeddings/high_freq_factor are kept (Llama 3.1: 4)."""
    original_max_position_embeddings: int = 8192
    """Context length of the pre-training whose RoPE is rescaled (Llama 3.1: 8192)."""

    def __post_init__(self) -> None:
        coerce_choices(self, "model.rope_scaling")

    def validate(self) -> None:
        """Positive sizes and factors, high_freq_factor above low_freq_factor (the blend divides by their gap)."""
        if self.type is RopeScaling.none:
            return
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            positive(f"model.rope_scaling.{name}", getattr(self, name))
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError("model.rope_scaling.high_freq_factor", self.high_freq_factor,
                              f"must exceed model.rope_scaling.low_freq_factor={self.low_freq_factor} "
                              "(Llama 3.1: 4 and 1)")


@dataclass
class ModelConfig:
    """GPT decoder shape and architecture choices."""

    name: str = "gpt"
    """Registered model builder."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads per block; must divide d_model."""
    n_kv_heads: int | None = None
    """Key/value heads per block (grouped-query attention: each serves n_heads/n_kv_heads query heads; 1 is
    multi-query attention); must divide n_heads. null: n_heads (plain multi-head attention)."""
    d_model: int = 128
    """Hidden size."""
    ffn_hidden: int | None = None
    """MLP hidden size; null: 4*d_model for gelu, 8/3*d_model rounded up to a multiple of 64 for swiglu."""
    vocab_size: int | None = None
    """Vocabulary size; null takes it from the dataset."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (size of learned position table / RoPE cache)."""
    norm: Norm = Norm.rmsnorm
    """rmsnorm or layernorm (pre-norm in every block)."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    position: Position = Position.rope
    """rope or learned position embeddings."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """RoPE frequency scaling (Llama 3.1's llama3 type); type=none by default."""
    mlp: Mlp = Mlp.swiglu
    """swiglu or gelu MLP."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""
    bias: bool = False
    """Biases in linear layers and norms."""
    dropout: float = 0.0
    """Dropout on attention and residual branches (0 for pre-training at scale)."""
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std/sqrt(2*n_layers) (GPT-2/Megatron)."""
    init_from: str | None = None
    """Local Hugging Face model directory (Llama- or GPT-2-style config.json + safetensors, e.g. from
    save_pretrained or trainrun-export) whose weights initialise the model; its config.json sets n_layers,
    n_heads, n_kv_heads, d_model, ffn_hidden, vocab_size, max_seq_len, norm, norm_eps, position, rope_theta,
    rope_scaling, mlp, tie_embeddings and bias, replacing the values given here (the orchestrator reads it
    before validation: turning a config into this dataclass reads no file). null: random init from run.seed."""

    def __post_init__(self) -> None:
        coerce_choices(self, "model")
        if isinstance(self.rope_scaling, dict):  # a config read back from JSON (checkpoint metadata)
            self.rope_scaling = RopeScalingConfig(**self.rope_scaling)

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads per block: ``n_kv_heads``, or ``n_heads`` when it is null."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def ffn_hidden_size(self) -> int:
        """MLP hidden size: ``ffn_hidden`` or the default for ``mlp``.

        SwiGLU has three matrices instead of two, so 8/3*d keeps its parameter count close to a 4*d
        GELU MLP (Shazeer 2020); rounding up to a multiple of 64 keeps matmul shapes kernel-friendly.
        """
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.mlp is Mlp.swiglu:
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    def validate(self) -> None:
        """Positive sizes, heads that divide the width, KV heads that divide the heads, an even RoPE head size,
        RoPE scaling only with RoPE."""
        for name in ("n_layers", "n_heads", "d_model", "max_seq_len"):
            positive(f"model.{name}", getattr(self, name))
        if self.d_model % self.n_heads:
            raise ConfigError("model.n_heads", self.n_heads,
                              f"must divide model.d_model={self.d_model}; pick a divisor of it")
        if self.position is Position.rope and self.head_dim % 2:
            raise ConfigError("model.n_heads", self.n_heads, "RoPE needs an even head size d_model/n_heads")
        optional_positive("model.n_kv_heads", self.n_kv_heads)
        if self.n_heads % self.kv_heads:
            raise ConfigError("model.n_kv_heads", self.n_kv_heads,
                              f"must divide model.n_heads={self.n_heads} (each key/value head serves a whole group "
                              "of query heads); pick a divisor of it, or null for one per query head")
        self.rope_scaling.validate()
        if self.rope_scaling.type is not RopeScaling.none and self.position is not Position.rope:
            raise ConfigError("model.rope_scaling.type", self.rope_scaling.type,
                              f"scales RoPE, but model.position={self.position}; set it to none")
        optional_positive("model.vocab_size", self.vocab_size)
        optional_positive("model.ffn_hidden", self.ffn_hidden)
        in_range("model.dropout", self.dropout, 0.0, 1.0, high_open=True)
        positive("model.norm_eps", self.norm_eps)
        positive("model.rope_theta", self.rope_theta)
        positive("model.init_std", self.init_std)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: str = "adamw"
    """Registered optimizer builder."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final LR of decaying schedules as a fraction of lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay of the matrices (linear and embedding weights); norm gains and biases never decay."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    schedule: str = "cosine"
    """Registered LR schedule: cosine, linear, constant, wsd (warmup-stable-decay, linear cooldown) or wsd_sqrt
    (warmup-stable-decay, 1-sqrt cooldown)."""
    warmup_steps: int = 20
    """Linear warmup steps from ~0 to lr."""
    decay_steps: int | None = None
    """Steps over which to decay after warmup; null: train.max_steps - warmup_steps."""
    wsd_decay_fraction: float = 0.2
    """wsd and wsd_sqrt only: fraction of decay_steps spent in the final decay (the cooldown)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    implementation: OptimizerImpl = OptimizerImpl.auto
    """auto, fused, foreach or for_loop (auto: fused on CUDA, foreach elsewhere)."""

    def __post_init__(self) -> None:
        coerce_choices(self, "optim")

    def validate(self) -> None:
        """Ranges of the AdamW and schedule hyper-parameters."""
        positive("optim.lr", self.lr)
        positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ConfigError("optim.decay_steps", self.decay_steps,
                              "must be positive, or null for max_steps - warmup_steps")
        in_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        in_range("optim.wsd_decay_fraction", self.wsd_decay_fraction, 0.0, 1.0)
        positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        in_range("optim.beta1", self.beta1, 0.0, 1.0, high_open=True)
        in_range("optim.beta2", self.beta2, 0.0, 1.0, high_open=True)
        positive("optim.eps", self.eps)
        if self.grad_clip < 0:
            raise ConfigError("optim.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")


@dataclass
class DataConfig:
    """Training data."""

    name: str = "stdlib"
    """Registered dataset: stdlib (bundled corpus, no download) or indexed (trainrun-prepare output)."""
    path: str | None = None
    """Dataset directory (train.bin/.idx, val.bin/.idx, meta.json); stdlib: its cache dir (conf sets
    ``${paths.cache_dir}``; null: ~/.cache/trainrun)."""
    seq_len: int = 128
    """Tokens per training sample (the model sees seq_len inputs and seq_len targets)."""
    val_fraction: float = 0.02
    """stdlib only: fraction of documents held out for validation."""
    max_documents: int | None = None
    """stdlib only: cap on the number of source files (null: all)."""
    subset: StdlibSubset = StdlibSubset.all
    """stdlib only: all, library (modules outside test directories) or tests (test modules)."""
    blend: Any = None
    """Training sources drawn by weight: a list of {name, weight, path[, dataset, subset, split]} or Megatron's
    flat "0.7 path/a 0.3 path/b"; null: the one dataset of data.name and data.path. Sample g's source follows
    from the weights and g alone, so resumes and layouts see the same stream."""
    valid_blend: Any = None
    """Validation sources, same forms (each entry reads its directory's val split unless it says split: train);
    null: each training source's val split (or its data.split share). val_loss is their weighted mean."""
    test_blend: Any = None
    """Test sources, same forms; null: each training source's test share under data.split (none without it)."""
    split: str | None = None
    """Megatron's split over each training source's documents, train,valid,test (e.g. "969,30,1"): the first
    share trains, the next validates, the last tests; null: the directories' own train and val splits."""
    allow_blend_change: bool = False
    """On resume, accept a blend whose sources or weights differ from the checkpoint's: continue from the same
    global sample count with the new weights (curriculum and annealing phases), each source where it was."""

    def __post_init__(self) -> None:
        coerce_choices(self, "data")

    def validate(self) -> None:
        """Sequence length, split fraction, blends and split (what the paths hold is checked at start-up)."""
        positive("data.seq_len", self.seq_len)
        in_range("data.val_fraction", self.val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        if self.max_documents is not None and self.max_documents < 2:
            raise ConfigError("data.max_documents", self.max_documents,
                              "need at least 2 documents (one for train, one for val); use null for all")
        for name in ("blend", "valid_blend", "test_blend"):
            parse_blend(getattr(self, name), f"data.{name}")
        parse_split(self.split)


@dataclass
class CompileConfig:
    """What ``torch.compile`` compiles: read by ``train.step_executor=compile`` only; every other executor refuses
    a value changed from its default at start-up."""

    scope: CompileScope = CompileScope.blocks
    """What of the model is compiled: blocks (each transformer block in place, torchtitan's style; parameter
    names and checkpoints unchanged), model (forward and loss as one graph) or none (only the optimizer step)."""
    optimizer: bool = False
    """Also compile the optimizer step; its LR then lives in a tensor the schedule fills in place, so a changing
    LR does not recompile it (checkpoints still store the float)."""

    def __post_init__(self) -> None:
        coerce_choices(self, "train.compile")


@dataclass
class CudaGraphConfig:
    """The whole-step CUDA graph: read by ``train.step_executor=cuda_graph`` only; every other executor refuses a
    value changed from its default at start-up."""

    warmup_steps: int = 3
    """Eager training steps on a side stream before the step is captured (they train)."""
    compile_blocks: bool = False
    """Compile each transformer block before capture (compile and CUDA graphs combined)."""

    def validate(self) -> None:
        """At least one warm-up step (cuBLAS, autograd and the optimizer state are set up in it)."""
        positive("train.cuda_graph.warmup_steps", self.warmup_steps)


@dataclass
class TrainConfig:
    """Training loop."""

    max_steps: int = 300
    """Optimizer steps to run."""
    micro_batch_size: int = 16
    """Samples per forward/backward per data-parallel rank."""
    global_batch_size: int = 32
    """Samples per optimizer step over all ranks; accumulation = global / (micro * dp)."""
    log_interval: int = 10
    """Steps between console lines / metrics.jsonl rows."""
    step_executor: str = "eager"
    """Registered step executor: eager, compile (torch.compile, see train.compile), cuda_graph (the whole step
    captured as one CUDA graph: forward, backward, clipping, optimizer; one GPU; see train.cuda_graph) or
    pipeline (a pipeline schedule: the one executor for parallel.pp>1). Each refuses at start-up what it
    cannot honour."""
    compile: CompileConfig = field(default_factory=CompileConfig)
    """Settings of the compile executor."""
    cuda_graph: CudaGraphConfig = field(default_factory=CudaGraphConfig)
    """Settings of the cuda_graph executor."""
    precision: Precision = Precision.fp32
    """fp32, bf16 (autocast), fp16 (autocast + dynamic loss scaling, CUDA only) or fp8 (torchao float8 linears,
    CUDA with compute capability >= 8.9, e.g. H100)."""
    progress_bar: bool = True
    """Show a tqdm progress bar on a terminal."""
    exit_interval: int | None = None
    """Stop (after saving) once this many steps ran in this process; exits with the resume code (3)."""
    exit_duration_min: float | None = None
    """Stop (after saving) once the training loop of this process has run this many minutes (max over ranks);
    exit code 3."""
    max_skipped_steps: int = 5
    """Consecutive steps with a non-finite loss or grad norm tolerated (each skipped); then exit code 4."""

    def __post_init__(self) -> None:
        coerce_choices(self, "train")

    def validate(self) -> None:
        """Positive step counts and batch sizes, positive exit limits, a CUDA-graph warm-up."""
        for name in ("max_steps", "micro_batch_size", "global_batch_size", "log_interval", "max_skipped_steps"):
            positive(f"train.{name}", getattr(self, name))
        self.cuda_graph.validate()
        optional_positive("train.exit_interval", self.exit_interval)
        optional_positive("train.exit_duration_min", self.exit_duration_min)


@dataclass
class EvalConfig:
    """Evaluation and text sampling."""

    name: str = "val_loss"
    """Registered evaluator."""
    interval: int = 100
    """Steps between evaluations (also runs at the end); 0 evaluates only at the end."""
    samples: int | None = None
    """Validation samples (seq_len windows) per source per evaluation, the same whatever the micro-batch size
    and layout; null: eval.iters global batches if set, else the whole validation split up to 512 samples
    (evenly spaced over a larger split)."""
    iters: int | None = None
    """Megatron's eval_iters: evaluate eval.iters x train.global_batch_size samples per source (eval.samples, when
    set, wins)."""
    test: bool = True
    """After a finished run, evaluate once on the test sources (data.split's test share or data.test_blend):
    test_loss and test_loss/<source>."""
    sample_tokens: int = 200
    """Tokens generated for the text sample printed at the end; 0 disables it."""
    sample_prompt: str = "def "
    """Prompt of the final text sample."""
    temperature: float = 0.8
    """Sampling temperature."""
    top_k: int = 40
    """Sample among the top-k tokens; 0 disables top-k filtering."""

    def validate(self) -> None:
        """Non-negative intervals and sample sizes, positive batch count and temperature."""
        positive("eval.interval", self.interval, allow_zero=True)
        optional_positive("eval.iters", self.iters)
        optional_positive("eval.samples", self.samples)
        positive("eval.sample_tokens", self.sample_tokens, allow_zero=True)
        positive("eval.temperature", self.temperature)
        positive("eval.top_k", self.top_k, allow_zero=True)


@dataclass
class ParallelConfig:
    """Process layout (degrees multiply to the world size)."""

    initializer: str = "auto"
    """Registered environment initializer: auto, single, torchrun or slurm."""
    dp_replicate: int = 1
    """Data-parallel replicas (DDP / HSDP outer dim)."""
    dp_shard: int = 1
    """Data-parallel shards (FSDP2)."""
    tp: int = 1
    """Tensor (+sequence) parallel degree."""
    pp: int = 1
    """Pipeline parallel degree."""
    collective_timeout_s: float = 600.0
    """Seconds a collective (or a wait on the rendezvous store) may block before it fails, instead of the
    backends' 30 minutes: a lost peer then ends the run with exit code 5 (PEER_LOST) after at most this long.
    It must exceed the longest time one rank may run ahead of the others (a save, an eval, a rank-0-only step)."""
    hang_timeout_s: float = 600.0
    """Hang watchdog (multi-process runs): exit with code 6 (HUNG), after writing every rank's Python stacks to
    <run dir>/hang/, when a rank's heartbeat, the rendezvous store or every rank's progress (step, eval and save
    boundaries) stalls this many seconds; longer than the slowest step, eval or save. 0 turns it off."""
    heartbeat_interval_s: float = 5.0
    """Seconds between a rank's heartbeats to the rendezvous store (what the hang watchdog reads)."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (ZeRO-3); false keeps them until backward (ZeRO-2-like)."""
    pp_schedule: PipelineSchedule = PipelineSchedule["1F1B"]
    """Pipeline schedule: GPipe, 1F1B or Interleaved1F1B."""
    pp_microbatches: int | None = None
    """Micro-batches per pipeline step; null: pp (or 2*pp for Interleaved1F1B)."""
    pp_stages_per_rank: int = 1
    """Virtual stages per pipeline rank (Interleaved1F1B needs >= 2)."""
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    """none, selective (every other block) or full (every block)."""

    def __post_init__(self) -> None:
        coerce_choices(self, "parallel")

    @property
    def world_size(self) -> int:
        """Processes this layout needs: the product of the degrees."""
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def data_parallel_size(self) -> int:
        """Number of data-parallel ranks (replicate x shard)."""
        return self.dp_replicate * self.dp_shard

    @property
    def interleaved(self) -> bool:
        """The schedule runs several virtual stages per rank."""
        return self.pp_schedule is PipelineSchedule["Interleaved1F1B"]

    def pipeline_microbatches(self) -> int:
        """``pp_microbatches``, or its default: pp (2*pp for Interleaved1F1B, so every virtual stage is busy)."""
        if self.pp_microbatches is not None:
            return self.pp_microbatches
        return self.pp * (2 if self.interleaved else 1)

    def validate(self) -> None:
        """Positive degrees and timeouts; a stage count per rank that fits the schedule."""
        for name in ("dp_replicate", "dp_shard", "tp", "pp", "pp_stages_per_rank"):
            positive(f"parallel.{name}", getattr(self, name))
        positive("parallel.collective_timeout_s", self.collective_timeout_s)
        positive("parallel.heartbeat_interval_s", self.heartbeat_interval_s)
        positive("parallel.hang_timeout_s", self.hang_timeout_s, allow_zero=True)
        if 0 < self.hang_timeout_s < 3 * self.heartbeat_interval_s:
            raise ConfigError("parallel.hang_timeout_s", self.hang_timeout_s,
                              f"must be at least 3 heartbeats (3 x parallel.heartbeat_interval_s="
                              f"{3 * self.heartbeat_interval_s:g}) so one late heartbeat is not a hang; raise it, "
                              "lower heartbeat_interval_s, or set 0 to turn the watchdog off")
        optional_positive("parallel.pp_microbatches", self.pp_microbatches)
        if self.pp == 1:
            self._refuse_pipeline_settings()
            return
        if self.interleaved and self.pp_stages_per_rank < 2:
            raise ConfigError("parallel.pp_stages_per_rank", self.pp_stages_per_rank,
                              "Interleaved1F1B needs at least 2 virtual stages per rank")
        if not self.interleaved and self.pp_stages_per_rank != 1:
            raise ConfigError("parallel.pp_stages_per_rank", self.pp_stages_per_rank,
                              f"{self.pp_schedule} runs one stage per rank; set it to 1 or use Interleaved1F1B")
        n_mb = self.pipeline_microbatches()
        if self.pp_schedule is not PipelineSchedule["GPipe"] and n_mb < self.pp:
            raise ConfigError("parallel.pp_microbatches", n_mb,
                              f"{self.pp_schedule} needs at least pp={self.pp} micro-batches")
        if self.interleaved and n_mb % self.pp:
            raise ConfigError("parallel.pp_microbatches", n_mb, f"Interleaved1F1B needs a multiple of pp={self.pp}")


    def _refuse_pipeline_settings(self) -> None:
        """Without pipeline parallelism the schedule settings are read by nothing: refuse a changed one."""
        defaults = ParallelConfig()
        for name in ("pp_schedule", "pp_microbatches", "pp_stages_per_rank"):
            if getattr(self, name) != getattr(defaults, name):
                raise ConfigError(f"parallel.{name}", getattr(self, name),
                                  "is read only with pipeline parallelism (parallel.pp>1); set parallel.pp or "
                                  "leave it at its default")


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written, and what is resumed.

    Each built-in policy is switched by its own field (interval, time_interval_min, save_best,
    non_persistent_interval, save_final); ``policies`` adds your own registered ones.
    """

    interval: int = 100
    """interval policy: save every N steps; 0 turns it off."""
    time_interval_min: float | None = None
    """time policy: save when this many minutes of wall time passed since the last save; null turns it off."""
    save_best: bool = False
    """best policy: save (persistently) whenever the validation loss improves."""
    save_final: bool = True
    """final policy: save a checkpoint when training finishes."""
    non_persistent_interval: int = 0
    """non_persistent policy: every N steps save a fast checkpoint to non_persistent_dir, keeping only the newest;
    0 turns it off."""
    non_persistent_dir: str | None = None
    """Directory of non-persistent checkpoints; each run keeps its own folder in it (run-<hash of the run dir>);
    null: <tmp>/trainrun-nonpersistent/<hash of the run dir>. On several nodes: the same path on every node, each
    node's own (local) disk; each node keeps its ranks' files."""
    local_replicas: int = 0
    """On several nodes: how many peer nodes also keep a copy of each node's non-persistent checkpoint (ring
    order), so that losing that many nodes' local disks loses no step; at most the number of nodes - 1."""
    policies: list[str] = field(default_factory=list)
    """Extra registered checkpoint policies by name (plugins); a checkpoint is saved when any policy asks."""
    keep_last: int = 3
    """Keep the newest N persistent checkpoints (never deleting the best or the resumed one); 0 keeps all."""
    verify: Verify = Verify.sha256
    """Manifest check on save/resume: sha256 (every byte; catches bit flips), size (file sizes only) or none."""
    exit_signals: list[ExitSignal] = field(
        default_factory=lambda: [ExitSignal.SIGINT, ExitSignal.SIGTERM, ExitSignal.SIGUSR1, ExitSignal.SIGUSR2])
    """Signals that make trainrun save at the next step boundary and exit with code 3 (INT: Ctrl-C, also
    what torchrun forwards on Ctrl-C, where a second one stops at once without saving; USR2: submitit's
    preemption signal)."""
    resume: str = "auto"
    """auto (the good checkpoint committed last in this run's checkpoint dirs), never, or a checkpoint path
    (or a checkpoint dir: its newest). A path applies to the first start only: once this run committed a
    checkpoint of its own, a restart (requeue) continues from that one."""
    async_save: bool = False
    """Write checkpoints in the background with DCP async save."""
    dir: str | None = None
    """Checkpoint directory; null: <run dir>/checkpoints."""
    load_optimizer: bool = True
    """Restore optimizer/scheduler/data state on resume (false: weights only, for fine-tuning; like a resume
    path, it applies to the first start only, later restarts restore this run's own full state)."""
    allow_data_change: bool = False
    """Resume (with its data position) although the dataset's checksum differs from the checkpoint's; logs a
    warning. False refuses such a resume: the data position means nothing on other data."""
    exit_verify: Verify | None = None
    """Manifest of the exit save (after a signal or the time limit): null: as ``verify``; size skips hashing, the
    slowest part of a save after writing, so the save fits a short grace period (see docs/checkpointing.md)."""
    exit_grace_s: float = 30.0
    """Seconds your launcher leaves between its stop signal and SIGKILL (torchrun: TORCH_ELASTIC_SHUTDOWN_TIMEOUT,
    30; Slurm: KillWait, 30 by default); a save slower than this is warned about, once. 0 turns the warning off."""
    max_failed_saves: int = 3
    """Stop the run (exit 1, with the cause) after this many periodic saves in a row failed, instead of
    training on for days without a checkpoint; 0 never stops."""

    def __post_init__(self) -> None:
        coerce_choices(self, "checkpoint")

    def validate(self) -> None:
        """Non-negative intervals and retention (whether a resume path exists is checked at start-up, see
        ``preflight``: turning a config into a dataclass touches no file)."""
        positive("checkpoint.interval", self.interval, allow_zero=True)
        positive("checkpoint.keep_last", self.keep_last, allow_zero=True)
        positive("checkpoint.non_persistent_interval", self.non_persistent_interval, allow_zero=True)
        positive("checkpoint.max_failed_saves", self.max_failed_saves, allow_zero=True)
        positive("checkpoint.local_replicas", self.local_replicas, allow_zero=True)
        if self.local_replicas and not self.non_persistent_interval:
            raise ConfigError("checkpoint.local_replicas", self.local_replicas,
                              "it copies non-persistent checkpoints, which are off; set "
                              "checkpoint.non_persistent_interval>0 or leave local_replicas at 0")
        positive("checkpoint.exit_grace_s", self.exit_grace_s, allow_zero=True)
        optional_positive("checkpoint.time_interval_min", self.time_interval_min)


@dataclass
class WandbConfig:
    """Weights & Biases logging."""

    enabled: bool = False
    """Log metrics to wandb (the one switch of this sink)."""
    mode: WandbMode = WandbMode.offline
    """online or offline (nothing leaves the machine; `wandb sync` uploads later)."""
    project: str = "trainrun"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team/user); null: wandb's default."""
    name: str | None = None
    """Run name; null: the run directory's name."""
    group: str | None = None
    """Run group; null: in a sweep, the sweep directory's name (all points of a sweep in one group)."""

    def __post_init__(self) -> None:
        coerce_choices(self, "logging.wandb")


@dataclass
class LoggingConfig:
    """Where metrics go. Each built-in sink has one switch (console, jsonl, tensorboard, wandb.enabled);
    ``sinks`` adds your own registered ones."""

    level: LogLevel = LogLevel.INFO
    """Python log level of trainrun's loggers."""
    console: bool = True
    """Print one console line per log interval."""
    jsonl: bool = True
    """Write metrics.jsonl in the run directory."""
    tensorboard: bool = False
    """Write tensorboard event files to <run dir>/tensorboard."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """wandb settings."""
    sinks: list[str] = field(default_factory=list)
    """Extra registered metric sinks by name (plugins)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per device for MFU; null: a table value for known GPUs, a nominal 1.0 on CPU."""
    all_ranks: bool = False
    """Log from every rank with a [rank N] prefix (default: rank 0 only)."""
    straggler_ratio: float = 1.5
    """Multi-process runs: at each log interval, name the slowest and fastest rank (data + forward time per step,
    gathered over ranks) in the log and metrics row when slowest/fastest exceeds this ratio; 0 turns it off."""

    def __post_init__(self) -> None:
        coerce_choices(self, "logging")

    def validate(self) -> None:
        """A positive peak for MFU; a straggler ratio above 1 (or 0: off)."""
        optional_positive("logging.peak_tflops", self.peak_tflops)
        if self.straggler_ratio != 0 and not self.straggler_ratio > 1:
            raise ConfigError("logging.straggler_ratio", self.straggler_ratio,
                              "must be above 1 (slowest/fastest), or 0 to turn straggler detection off")


@dataclass
class PathsConfig:
    """Where data, caches and run outputs live; conf/paths/default.yaml reads them from the environment."""

    data_dir: str = "data"
    """Root of prepared datasets (``data.path=${paths.data_dir}/<name>``); env TRAINRUN_DATA_DIR."""
    cache_dir: str = "~/.cache/trainrun"
    """Caches such as the bundled corpus; env TRAINRUN_CACHE_DIR."""
    output_dir: str = "outputs"
    """Root of run and sweep directories (``hydra.run.dir`` and ``hydra.sweep.dir`` live under it);
    env TRAINRUN_OUTPUT_DIR."""


@dataclass
class DebugConfig:
    """Debugging aids; the presets in conf/debug/ set them (``debug=fast|overfit|profile|nan``)."""

    overfit_batches: int = 0
    """Train on the first N micro-batches of this rank over and over (the loss must approach 0); 0: normal data."""
    profile_steps: int = 0
    """Trace this many steps with the torch profiler into <run dir>/profile/; 0 turns profiling off."""
    profile_wait_steps: int = 2
    """Steps to run before the profiler starts (one more warms it up), so start-up is not traced."""
    inject_nan_at_steps: list[int] = field(default_factory=list)
    """Make the loss of these steps (1-based) NaN, to exercise skipped-step handling."""
    memory_snapshot: bool = False
    """Record every CUDA allocation and write <run dir>/profile/memory_snapshot_rank<R>.pickle at the end
    (view it at pytorch.org/memory_viz); CUDA only."""

    def validate(self) -> None:
        """Non-negative counts and 1-based NaN steps."""
        positive("debug.overfit_batches", self.overfit_batches, allow_zero=True)
        positive("debug.profile_steps", self.profile_steps, allow_zero=True)
        positive("debug.profile_wait_steps", self.profile_wait_steps, allow_zero=True)
        for step in self.inject_nan_at_steps:
            positive("debug.inject_nan_at_steps", step)


@dataclass
class TrainRunConfig:
    """The composed configuration of one run."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return self.train.global_batch_size // (self.train.micro_batch_size * self.parallel.data_parallel_size)

    def groups(self) -> dict[str, object]:
        """Each group's config by name, in schema order."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}
