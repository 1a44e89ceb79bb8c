//! Configuration parameters (GUCs) of the extension.

use pg_llm_engine::model::DType;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::PostgresGucEnum;

/// `pg_llm.threads`: compute threads per backend for kernels and models (0 = all cores),
/// at most `pg_llm.max_threads`.
pub static THREADS: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `pg_llm.max_threads`: the most compute threads any backend may use (0 = one per core);
/// superuser-only, so an ordinary role cannot take more than the operator allows.
pub static MAX_THREADS: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `pg_llm.max_memory`: the most memory one call may need, in MB (-1 = half of the memory
/// the server may use); superuser-only. See admission.rs.
pub static MAX_MEMORY_MB: GucSetting<i32> = GucSetting::<i32>::new(-1);

/// `pg_llm.weight_files`: share loaded weights between backends through files in
/// `$PGDATA/pg_llm_cache` (see model_cache.rs).
pub static WEIGHT_FILES: GucSetting<bool> = GucSetting::<bool>::new(true);

/// `pg_llm.weight_cache_size`: bound on the total size of the weight files, in MB.
pub static WEIGHT_CACHE_MB: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);

/// `pg_llm.train_recompute`: keep only each layer's input during a training forward and
/// recompute the rest in the backward (less memory, about a third more work).
pub static TRAIN_RECOMPUTE: GucSetting<bool> = GucSetting::<bool>::new(false);

/// `pg_llm.train_micro_batch`: sequences per forward/backward pass of a training step; the
/// gradients of the passes are accumulated into the step's (0 = the whole batch at once).
pub static TRAIN_MICRO_BATCH: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `pg_llm.train_precision`: the precision of a training step's passes (mixed precision);
/// the weights and AdamW moments stay float32.
pub static TRAIN_PRECISION: GucSetting<TrainPrecision> =
    GucSetting::<TrainPrecision>::new(TrainPrecision::Float32);

/// `pg_llm.train_loss_scale`: the loss scale a float16 run starts from when the model's
/// training log holds no float16 step to continue from.
pub static TRAIN_LOSS_SCALE: GucSetting<f64> =
    GucSetting::<f64>::new(pg_llm_engine::optim::LossScaler::INITIAL_SCALE as f64);

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum TrainPrecision {
    #[name = c"float32"]
    Float32,
    #[name = c"bfloat16"]
    Bfloat16,
    #[name = c"float16"]
    Float16,
}

/// The precision `pg_llm.train_precision` asks for.
pub fn train_precision() -> DType {
    match TRAIN_PRECISION.get() {
        TrainPrecision::Float32 => DType::Float32,
        TrainPrecision::Bfloat16 => DType::Bfloat16,
        TrainPrecision::Float16 => DType::Float16,
    }
}

/// `pg_llm.autograd`: tensor kernels record their calls on this session's tape (tape.rs).
pub static AUTOGRAD: GucSetting<bool> = GucSetting::<bool>::new(false);

/// The bound of `pg_llm.weight_cache_size` in bytes.
pub fn weight_cache_bytes() -> u64 {
    WEIGHT_CACHE_MB.get().max(1) as u64 * (1 << 20)
}

pub fn register() {
    GucRegistry::define_int_guc(
        c"pg_llm.max_memory",
        c"Most memory one pg_llm call may need (-1 = half of the server's memory).",
        c"Calls that allocate in proportion to a model, a batch or an input estimate their need \
          first (the model's weights plus working memory) and are refused with SQLSTATE 53200 \
          when it exceeds this. Applies to each call on its own, not to all connections \
          together. Only superusers (or roles granted SET on it) may change it.",
        &MAX_MEMORY_MB,
        -1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_int_guc(
        c"pg_llm.max_threads",
        c"Most compute threads a backend may use for pg_llm, whatever pg_llm.threads asks (0 = one per CPU core).",
        c"Caps pg_llm.threads, which any role may set. Only superusers (or roles granted SET on \
          it) may change it.",
        &MAX_THREADS,
        0,
        pg_llm_engine::parallel::MAX_THREADS as i32,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_llm.autograd",
        c"Record every tensor kernel call on this session's autograd tape.",
        c"While on, each pg_llm_* kernel call adds its inputs, output and attributes to the \
          session's tape (the llm_tape and llm_tensor_rt views), and llm_backprop computes \
          gradients over it. The tape lives in the session's memory until llm_tape_reset().",
        &AUTOGRAD,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_llm.train_recompute",
        c"Recompute activations in the backward pass of training instead of keeping them.",
        c"Keeps one layer's input per layer during a training step's forward pass and recomputes \
          the layer during the backward: activation memory of one layer instead of all, for \
          about a third more arithmetic. The update is the same.",
        &TRAIN_RECOMPUTE,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"pg_llm.train_precision",
        c"Precision of training passes: float32, bfloat16 or float16 (mixed precision).",
        c"With bfloat16 or float16 a step's forward and backward run on a copy of the weights \
          whose matrices and embeddings are rounded to it, with the linear layers' inputs and \
          incoming gradients rounded too (as torch.autocast); LayerNorm, softmax, activations \
          and the loss compute in float32, and the update applies to the float32 weights and \
          moments. float16 adds dynamic loss scaling: a step whose gradient overflows is \
          skipped and logged as such in llm_train_log.",
        &TRAIN_PRECISION,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"pg_llm.train_loss_scale",
        c"Loss scale a float16 training run starts from.",
        c"Used when the model's llm_train_log holds no float16 step; otherwise a run continues \
          from the logged scale (halved after an overflow, doubled after 2000 steps without \
          one).",
        &TRAIN_LOSS_SCALE,
        f32::MIN_POSITIVE as f64,
        f32::MAX as f64,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_llm.train_micro_batch",
        c"Sequences per forward/backward pass of a training step (0 = the whole batch).",
        c"A batch larger than this is processed in passes whose gradients are accumulated; the \
          update equals the whole batch's.",
        &TRAIN_MICRO_BATCH,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_llm.weight_cache_size",
        c"Largest total size of the weight files in pg_llm_cache, all databases together.",
        c"Before a new weight file is written the least recently used ones are removed until it \
          fits; a model larger than the bound stays private to each connection.",
        &WEIGHT_CACHE_MB,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_bool_guc(
        c"pg_llm.weight_files",
        c"Share loaded model weights between connections through files in pg_llm_cache.",
        c"A model's weights are read from llm_param once, written to a checksummed file under \
          the data directory and mapped by every connection that uses that version; off reads \
          them into each connection's private memory instead.",
        &WEIGHT_FILES,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_llm.threads",
        c"Compute threads each backend may use for pg_llm kernels (0 = one per CPU core).",
        c"Threads run pure computation only; they never call into PostgreSQL. Capped by \
          pg_llm.max_threads.",
        &THREADS,
        0,
        pg_llm_engine::parallel::MAX_THREADS as i32,
        GucContext::Userset,
        GucFlags::default(),
    );
}

/// Pushes the current settings to the engine; called on entry to every compute function.
pub fn apply() {
    pg_llm_engine::parallel::set_threads(threads());
}

/// The compute threads a call gets: `pg_llm.threads` (0 = one per core) within
/// `pg_llm.max_threads` (0 = one per core).
pub fn threads() -> usize {
    let cores = pg_llm_engine::parallel::available_threads();
    let or_cores = |v: i32| if v <= 0 { cores } else { v as usize };
    or_cores(THREADS.get()).min(or_cores(MAX_THREADS.get()))
}
