"""Typed dataclass schemas: the single source of truth for every knob.

Each group is stored in Hydra's ConfigStore as ``base_<group>`` (see ``store.py``); the YAML files
under ``conf/`` only pick and tweak these defaults. Attribute docstrings document each field.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunConfig:
    """Run-wide settings."""

    seed: int = 1234
    """Seed for model init, data order and sampling; each rank derives its own from it."""
    dry_run: bool = False
    """Build the model on the meta device, print size/FLOPs/memory estimates and exit 0."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda."""
    output_dir: str | None = None
    """Run directory; null uses Hydra's run dir (``hydra.run.dir``) or the current directory."""
    plugins: list[str] = field(default_factory=list)
    """Python modules imported before the run so that they can register components."""
    deterministic: bool = True
    """Ask torch for deterministic kernels (bit-exact resume on CPU)."""


@dataclass
class ModelConfig:
    """GPT decoder shape and architecture choices."""

    name: str = "gpt"
    """Registered model builder."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads per block; must divide d_model."""
    d_model: int = 128
    """Hidden size."""
    ffn_hidden: int | None = None
    """MLP hidden size; null: 4*d_model for gelu, 8/3*d_model rounded up to a multiple of 64 for swiglu."""
    vocab_size: int | None = None
    """Vocabulary size; null takes it from the dataset."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (size of learned position table / RoPE cache)."""
    norm: str = "rmsnorm"
    """rmsnorm or layernorm (pre-norm in every block)."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    position: str = "rope"
    """rope or learned position embeddings."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    mlp: str = "swiglu"
    """swiglu or gelu MLP."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""
    bias: bool = False
    """Biases in linear layers and norms."""
    dropout: float = 0.0
    """Dropout on attention and residual branches (0 for pre-training at scale)."""
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std/sqrt(2*n_layers) (GPT-2/Megatron)."""


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
    """Decoupled weight decay; never applied to norms, biases (or embeddings when disabled below)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    schedule: str = "cosine"
    """Registered LR schedule: cosine, linear, constant or wsd (warmup-stable-decay)."""
    warmup_steps: int = 20
    """Linear warmup steps from ~0 to lr."""
    decay_steps: int | None = None
    """Steps over which to decay after warmup; null: train.max_steps - warmup_steps."""
    wsd_decay_fraction: float = 0.2
    """wsd only: fraction of decay_steps spent in the final decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    implementation: str = "auto"
    """auto, fused, foreach or for_loop (auto: fused on CUDA, foreach elsewhere)."""


@dataclass
class DataConfig:
    """Training data."""

    name: str = "stdlib"
    """Registered dataset: stdlib (bundled corpus, no download) or indexed (trainrun-prepare output)."""
    path: str | None = None
    """Dataset directory (train.bin/.idx, val.bin/.idx, meta.json); stdlib: cache dir (null: ~/.cache/trainrun)."""
    seq_len: int = 128
    """Tokens per training sample (the model sees seq_len inputs and seq_len targets)."""
    val_fraction: float = 0.02
    """stdlib only: fraction of documents held out for validation."""
    max_documents: int | None = None
    """stdlib only: cap on the number of source files (null: all)."""


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
    """Registered step executor: eager, compile (torch.compile) or cuda_graph."""
    precision: str = "fp32"
    """fp32, bf16 (autocast) or fp16 (autocast + grad scaler, CUDA only)."""
    progress_bar: bool = True
    """Show a tqdm progress bar on a terminal."""
    exit_interval: int | None = None
    """Stop (after saving) once this many steps ran in this process; exits with the resume code (3)."""
    exit_duration_min: float | None = None
    """Stop (after saving) once the training loop of this process has run this many minutes (max over ranks); exit code 3."""
    max_skipped_steps: int = 5
    """Consecutive steps with a non-finite loss or grad norm tolerated (each skipped); then exit code 4."""
    inject_nan_at_steps: list[int] = field(default_factory=list)
    """Testing hook: poison the loss of these steps (1-based) to exercise bad-step handling."""


@dataclass
class EvalConfig:
    """Evaluation and text sampling."""

    name: str = "val_loss"
    """Registered evaluator."""
    interval: int = 100
    """Steps between evaluations (also runs at the end); 0 evaluates only at the end."""
    iters: int = 10
    """Validation batches per evaluation."""
    sample_tokens: int = 200
    """Tokens generated for the text sample printed at the end; 0 disables it."""
    sample_prompt: str = "def "
    """Prompt of the final text sample."""
    temperature: float = 0.8
    """Sampling temperature."""
    top_k: int = 40
    """Sample among the top-k tokens; 0 disables top-k filtering."""


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
    timeout_min: float = 10.0
    """Collective timeout in minutes."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (ZeRO-3); false keeps them until backward (ZeRO-2-like)."""
    pp_schedule: str = "1F1B"
    """Pipeline schedule: GPipe, 1F1B or Interleaved1F1B."""
    pp_microbatches: int | None = None
    """Micro-batches per pipeline step; null: pp (or 2*pp for Interleaved1F1B)."""
    pp_stages_per_rank: int = 1
    """Virtual stages per pipeline rank (Interleaved1F1B needs >= 2)."""
    activation_checkpointing: str = "none"
    """none, selective (every other block) or full (every block)."""


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written, and what is resumed."""

    policies: list[str] = field(default_factory=lambda: ["interval", "time", "best", "non_persistent", "final"])
    """Registered checkpoint policies, combined: a checkpoint is saved when any of them asks."""
    interval: int = 100
    """interval policy: save every N steps; 0 disables it."""
    time_interval_min: float | None = None
    """time policy: save when this many minutes of wall time passed since the last save; null disables it."""
    save_best: bool = False
    """best policy: save (persistently) whenever the validation loss improves."""
    non_persistent_interval: int = 0
    """non_persistent policy: every N steps save a fast checkpoint to non_persistent_dir, keeping only the newest."""
    non_persistent_dir: str | None = None
    """Directory of non-persistent checkpoints; null: <tmp>/trainrun-nonpersistent/<hash of the run dir>."""
    keep_last: int = 3
    """Keep the newest N persistent checkpoints (never deleting the best or the resumed one); 0 keeps all."""
    verify: str = "sha256"
    """Manifest check on save/resume: sha256 (every byte; catches bit flips), size (file sizes only) or none."""
    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that make trainrun save at the next step boundary and exit with code 3."""
    resume: str = "auto"
    """auto (newest complete checkpoint in the checkpoint dir), never, or a checkpoint path."""
    async_save: bool = False
    """Write checkpoints in the background with DCP async save."""
    dir: str | None = None
    """Checkpoint directory; null: <run dir>/checkpoints."""
    save_final: bool = True
    """final policy: save a checkpoint when training finishes."""
    load_optimizer: bool = True
    """Restore optimizer/scheduler/data state on resume (false: weights only, for fine-tuning)."""


@dataclass
class WandbConfig:
    """Weights & Biases logging."""

    enabled: bool = False
    """Log metrics to wandb."""
    mode: str = "offline"
    """online, offline (nothing leaves the machine) or disabled."""
    project: str = "trainrun"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team/user); null: wandb's default."""
    name: str | None = None
    """Run name; null: the run directory's name."""


@dataclass
class LoggingConfig:
    """Where metrics go."""

    level: str = "INFO"
    """Python log level of trainrun's loggers."""
    jsonl: bool = True
    """Write metrics.jsonl in the run directory."""
    console: bool = True
    """Print one console line per log interval."""
    tensorboard: bool = False
    """Write tensorboard event files to <run dir>/tensorboard."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """wandb settings."""
    sinks: list[str] = field(default_factory=list)
    """Extra registered metric sinks by name."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per device for MFU; null: a table value for known GPUs, a nominal 1.0 on CPU."""
    all_ranks: bool = False
    """Log from every rank with a [rank N] prefix (default: rank 0 only)."""


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
