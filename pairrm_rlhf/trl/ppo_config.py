"""PPO's settings (`PPOConfig`): what `PPOTrainer` reads, with their defaults from "The N Implementation Details of
RLHF with PPO" (Huang et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PPOConfig:
    """PPO hyper-parameters. Rollouts per process per update = per_device_train_batch_size x
    gradient_accumulation_steps x num_mini_batches."""

    output_dir: str = field(default="ppo-output", metadata={"help": "where the policy, value head and logs are saved"})
    seed: int = field(default=42, metadata={"help": "seed of data order and sampling"})
    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW learning rate (policy and value head)"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name"})
    warmup_steps: int = field(default=0, metadata={"help": "scheduler warm-up optimizer steps"})
    adam_epsilon: float = field(default=1e-5, metadata={"help": "AdamW eps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "micro-batch of one forward/backward"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    num_mini_batches: int = field(default=1, metadata={"help": "optimizer steps per PPO epoch"})
    num_ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout batch"})
    total_episodes: int | None = field(default=None, metadata={
        "help": "rollouts in all (default: num_train_epochs x dataset)"})
    num_train_epochs: float = field(default=1.0, metadata={
        "help": "passes over the prompts when total_episodes is unset"})
    local_rollout_forward_batch_size: int = field(default=64, metadata={"help": "rows per no-grad generate/forward"})
    max_prompt_length: int | None = field(default=512, metadata={"help": "prompts are cut from the left to this"})
    max_new_tokens: int = field(default=53, metadata={"help": "response length limit"})
    sampling_backend: str = field(default="transformers", metadata={
        "help": "rollouts sampled by transformers' generate or vllm (a vllm.LLM colocated on each GPU, the policy's "
                "weights pushed after every update; pip install vllm)"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "sampling_backend vllm: the share of each GPU's memory the rollout engine takes (vLLM's "
                "gpu_memory_utilization)"})
    temperature: float = field(default=0.7, metadata={
        "help": "sampling temperature (also applied when recomputing logprobs)"})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "subtracted from the (scaled) score of responses without EOS"})
    kl_coef: float = field(default=0.05, metadata={"help": "per-token KL penalty coefficient"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss weight"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    whiten_rewards: bool = field(default=False, metadata={"help": "whiten per-token rewards before GAE"})
    separate_critic: bool = field(default=False, metadata={
        "help": "value head on a trainable copy of the initial policy's backbone (value gradients never reach the "
                "policy) instead of on the policy's own hidden state"})
    reward_scaling: str = field(default="none", metadata={
        "help": "scores to mean 0, std 1: none, initial (the first rollout's statistics, fixed) or running"})
    logging_steps: int = field(default=1, metadata={"help": "log every N updates"})
    save_steps: int = field(default=0, metadata={
        "help": "write a resumable checkpoint-<update> every N updates (0: none)"})
    save_total_limit: int | None = field(default=None, metadata={"help": "keep only the newest N checkpoints"})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "a checkpoint-<update> directory to resume from, or 'true' for the latest one in output_dir"})
    save_final: bool = field(default=True, metadata={"help": "save the policy and value head at the end"})
    keep_half_precision_weights: bool = field(default=False, metadata={
        "help": "train bf16/fp16 weights directly instead of fp32 master weights (updates below their resolution "
                "are lost)"})
    use_cpu: bool = field(default=False, metadata={"help": "train on CPU even when CUDA is available"})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing in the policy"})
    report_to: list[str] = field(default_factory=list, metadata={
        "help": "accelerate trackers: wandb, tensorboard, ..."})

    @property
    def local_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches
