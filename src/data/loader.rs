//! A prefetching loader: a producer thread assembles batches in order, each batch's samples decoded and augmented
//! in parallel on a rayon pool straight into the batch tensor, and hands them over through a bounded channel.
//!
//! Everything random is a function of (seed, epoch, sample index): the epoch order comes from (seed, epoch) and
//! each sample's augmentation from its own ChaCha stream, so batches do not depend on the number of workers or on
//! thread scheduling, and an epoch resumed at batch k yields exactly batches k.. of the uninterrupted run.
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use super::dataset::Dataset;
use super::decode::decode_image;
use super::transforms::Transform;
use crate::error::{Error, Result};
use crate::device::{copy_ahead, Ready};

/// Decode threads of a process by default ([`decode_threads`]).
pub fn default_workers() -> usize {
    decode_threads().threads
}

/// The default decode-thread count and why it is that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeThreads {
    pub threads: usize,
    /// One line for the run's first lines: the count and where it came from.
    pub why: String,
}

/// The decode threads of this process, from what it may run on: the CPUs of its affinity mask (and cgroup quota,
/// as `available_parallelism` reads them) when a launcher gave each rank a share of its own (`srun
/// --cpus-per-task` with task binding, `taskset`, `numactl`); divided among the ranks on this node when they share
/// one mask (torchrun on a bare node or inside a partial allocation, a container's cpuset, srun without per-task
/// binding: 8 ranks would each start as many threads as the mask has CPUs); never above `SLURM_CPUS_PER_TASK`.
pub fn decode_threads() -> DecodeThreads {
    static ONCE: std::sync::OnceLock<DecodeThreads> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let launch = crate::dist::launch::LaunchEnv::from_env().map(|e| e.launcher).unwrap_or(crate::dist::launch::Launcher::Single);
        let per_task = env("SLURM_CPUS_PER_TASK").and_then(|v| v.trim().parse::<usize>().ok()).filter(|&c| c > 0);
        let cpus = Cpus { mask: affinity_cpus().unwrap_or(usable), online: online_cpus().unwrap_or(usable), usable, per_task };
        decode_threads_for(cpus, crate::dist::launch::local_world_size(), launch == crate::dist::launch::Launcher::Torchrun)
    })
    .clone()
}

/// What a process may run on, for [`decode_threads_for`].
#[derive(Debug, Clone, Copy)]
pub struct Cpus {
    /// CPUs in its affinity mask.
    pub mask: usize,
    /// The node's online CPUs.
    pub online: usize,
    /// CPUs it may use (mask and cgroup quota).
    pub usable: usize,
    /// Slurm's `SLURM_CPUS_PER_TASK`.
    pub per_task: Option<usize>,
}

/// [`decode_threads`] from its inputs: the CPUs, the ranks on this node and whether the launcher is torchrun
/// (whose ranks never get masks of their own).
pub fn decode_threads_for(c: Cpus, local_ranks: usize, torchrun: bool) -> DecodeThreads {
    let local_ranks = local_ranks.max(1);
    let (mask, online, usable) = (c.mask, c.online, c.usable);
    // Whether the ranks on this node share one mask: always under torchrun; under Slurm when the mask is larger
    // than a task's share; otherwise when the ranks' masks could not be disjoint.
    let shared = local_ranks > 1
        && (torchrun || mask >= online || c.per_task.map_or(mask.saturating_mul(local_ranks) > online, |t| mask > t));
    let (mut threads, mut why) = if shared {
        ((usable / local_ranks).max(1), format!("the {usable} CPUs of one affinity mask ({mask} of the node's {online}) shared by {local_ranks} ranks on this node"))
    } else if mask < online {
        (usable.max(1), format!("the {usable} CPUs this process may use (its affinity mask holds {mask} of the node's {online}: the launcher's share, not divided again)"))
    } else {
        (usable.max(1), format!("the {usable} CPUs this process may use"))
    };
    if let Some(t) = c.per_task.filter(|&t| t < threads) {
        threads = t;
        why.push_str(&format!(", capped by SLURM_CPUS_PER_TASK={t}"));
    }
    DecodeThreads { threads, why }
}

/// The decode threads of a run and why, for its first lines: `explicit` is the count the user asked for
/// (`--workers`, `num_workers`), None or 0 for the default.
pub fn workers_line(explicit: Option<usize>, option: &str) -> (usize, String) {
    match explicit.filter(|&w| w > 0) {
        Some(w) => (w, format!("decode threads: {w} ({option})")),
        None => {
            let d = decode_threads();
            (d.threads, format!("decode threads: {} per process, {}; {option} overrides", d.threads, d.why))
        }
    }
}

/// CPUs in this process's affinity mask (sched_getaffinity), None where it cannot be read.
fn affinity_cpus() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a zeroed cpu_set_t of the size passed; the kernel fills it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if rc == 0 {
            let n = unsafe { libc::CPU_COUNT(&set) };
            return usize::try_from(n).ok().filter(|&n| n > 0);
        }
    }
    None
}

/// The node's online CPUs.
fn online_cpus() -> Option<usize> {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).ok().filter(|&n| n > 0)
}

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Shuffle every epoch (train); off keeps the dataset order (eval).
    pub shuffle: bool,
    /// Drop the last partial batch of each rank.
    pub drop_last: bool,
    pub seed: u64,
    /// Data-parallel shard of this process (see [`Loader::epoch_indices`]).
    pub rank: usize,
    pub world_size: usize,
    /// Decode/augment threads.
    pub workers: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    /// A file that cannot be decoded is an error instead of a warning and a skip.
    pub strict: bool,
    /// The CUDA device the batches go to: the producer thread binds itself to it and puts every batch in pinned
    /// memory for non-blocking copies (None, or the CPU: neither).
    pub pin_device: Option<Device>,
    /// No warnings on stderr (the skips are still counted).
    pub quiet: bool,
    /// Decode JPEGs at a reduced DCT scale when the first op is a RandomResizedCrop whose crop allows it (cargo
    /// feature `turbojpeg`). Off by default: it changes pixels relative to torchvision + PIL (see
    /// [`Transform::apply_encoded`]).
    pub dct_scaling: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 64,
            shuffle: true,
            drop_last: false,
            seed: 0,
            rank: 0,
            world_size: 1,
            workers: default_workers(),
            prefetch: 2,
            strict: false,
            pin_device: None,
            quiet: false,
            dct_scaling: false,
        }
    }
}

/// A batch: `images` `[B,3,H,W]` f32 normalised, `labels` `[B]` i64, and the dataset indices of its samples.
/// B is smaller than the batch size for the last batch, or when undecodable files were skipped.
#[derive(Debug)]
pub struct Batch {
    pub images: Tensor,
    pub labels: Tensor,
    pub indices: Vec<usize>,
    /// Position of this batch in the epoch (the value to resume from is `batch + 1`).
    pub batch: usize,
    /// Samples of this batch that were skipped because they could not be read.
    pub skipped: usize,
}

/// `b`'s images and labels on `device`, copied ahead of their step ([`copy_ahead`]).
pub fn stage_batch(b: Batch, device: Device) -> Result<(Batch, Ready)> {
    let (mut t, ready) = copy_ahead(&[&b.images, &b.labels], device)?;
    let (labels, images) = (t.pop().expect("two tensors"), t.pop().expect("two tensors"));
    Ok((Batch { images, labels, ..b }, ready))
}

/// `b`'s images on `device`, copied ahead ([`copy_ahead`]); the labels stay on the host (loops that collect them).
pub fn stage_images(b: Batch, device: Device) -> Result<(Batch, Ready)> {
    let (mut t, ready) = copy_ahead(&[&b.images], device)?;
    Ok((Batch { images: t.pop().expect("one tensor"), ..b }, ready))
}

/// The rng for one sample's augmentation: ChaCha8 keyed by the seed, on stream (epoch, index).
pub fn sample_rng(seed: u64, epoch: u64, index: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream((epoch << 32) ^ index as u64);
    rng
}

fn shuffle_rng(seed: u64, epoch: u64) -> ChaCha8Rng {
    // A key distinct from the augmentation streams.
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9E37_79B9_7F4A_7C15);
    rng.set_stream(epoch);
    rng
}

struct Shared {
    dataset: Dataset,
    transform: Transform,
    out_hw: (u32, u32),
    cfg: LoaderConfig,
    pool: rayon::ThreadPool,
    skipped: AtomicUsize,
    warned: Mutex<HashSet<usize>>,
}

#[derive(Clone)]
pub struct Loader {
    shared: Arc<Shared>,
}

impl Loader {
    pub fn new(dataset: Dataset, transform: Transform, cfg: LoaderConfig) -> Result<Loader> {
        let out_hw = transform.validate()?;
        if cfg.batch_size == 0 {
            return Err(Error::option("batch_size", "must be positive"));
        }
        // Each batch is one tensor, allocated by libtorch (which panics where it cannot).
        let batch_bytes = cfg.batch_size as u128 * 3 * out_hw.0 as u128 * out_hw.1 as u128 * 4;
        crate::info::check_fits("batch_size", &format!("batches of {} images of {}x{}", cfg.batch_size, out_hw.1, out_hw.0), batch_bytes)?;
        // A thread per worker: far more than any machine's cores only exhausts the process (seen: a hang, then abort).
        if cfg.workers > 1024 {
            return Err(Error::option("workers", format!("{} decode threads is more than 1024", cfg.workers)));
        }
        if cfg.dct_scaling && !cfg!(feature = "turbojpeg") {
            return Err(Error::option("dct_scaling", "DCT-scaled JPEG decoding needs a build with --features turbojpeg"));
        }
        if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
            return Err(Error::option("rank", format!("rank {} is not in 0..{}", cfg.rank, cfg.world_size)));
        }
        if dataset.is_empty() {
            return Err(Error::data(&dataset.dir, "the dataset has no samples"));
        }
        // Samples a cut or corrupt shard lost are unreadable images that no batch will meet: refused here.
        if let Some(l) = dataset.lost().first().filter(|_| cfg.strict) {
            let others = match &dataset.lost()[1..] {
                [] => String::new(),
                more => format!(", and {} in {} other shard(s)", more.iter().map(|m| m.count.map_or("the rest".to_string(), |n| n.to_string())).collect::<Vec<_>>().join(" + "), more.len()),
            };
            return Err(Error::data(dataset.dir.join(&l.shard), format!("{} samples cannot be read from byte {} ({}){others}; an evaluation over part of the split is not comparable (--skip-bad evaluates the rest and lists them)", l.count.map_or("the rest of the shard's".to_string(), |n| n.to_string()), l.offset, l.why)));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.workers.max(1))
            .thread_name(|i| format!("lmim-data-{i}"))
            .build()
            .map_err(|e| Error::option("workers", e.to_string()))?;
        Ok(Loader {
            shared: Arc::new(Shared {
                dataset,
                transform,
                out_hw,
                cfg,
                pool,
                skipped: AtomicUsize::new(0),
                warned: Mutex::new(HashSet::new()),
            }),
        })
    }

    pub fn dataset(&self) -> &Dataset {
        &self.shared.dataset
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.shared.cfg
    }

    /// Files skipped so far (each time one is met).
    pub fn skipped(&self) -> usize {
        self.shared.skipped.load(Ordering::Relaxed)
    }

    /// The files skipped so far, each once, sorted, then the samples lost in cut or corrupt shards
    /// (`<split>/<shard>#<n>`: the shard's n-th sample).
    pub fn skipped_files(&self) -> Vec<std::path::PathBuf> {
        let ids = self.shared.warned.lock().unwrap_or_else(|e| e.into_inner());
        let mut files: Vec<std::path::PathBuf> = ids.iter().map(|&i| self.shared.dataset.samples[i].0.clone()).collect();
        files.sort();
        files.extend(self.shared.dataset.lost_paths());
        files
    }

    /// This rank's sample order for `epoch`. Training (`drop_last`): the epoch order is cut into global
    /// micro-batches of `batch_size` and rank r takes micro-batches r, r + world, ..., which makes a step's samples independent of how they are spread over ranks and
    /// accumulation. Evaluation: rank r takes the r-th contiguous block of ceil(n / world) samples, so rank-ordered
    /// results concatenate into dataset order.
    pub fn epoch_indices(&self, epoch: u64) -> Vec<usize> {
        let cfg = &self.shared.cfg;
        let n = self.shared.dataset.len();
        let mut order: Vec<usize> = (0..n).collect();
        if cfg.shuffle {
            order.shuffle(&mut shuffle_rng(cfg.seed, epoch));
        }
        let (bs, w) = (cfg.batch_size, cfg.world_size);
        if cfg.drop_last {
            (cfg.rank..n / bs).step_by(w).flat_map(|g| order[g * bs..][..bs].iter().copied()).collect()
        } else {
            let per = n.div_ceil(w);
            order[(cfg.rank * per).min(n)..((cfg.rank + 1) * per).min(n)].to_vec()
        }
    }

    /// Batches per epoch for this rank.
    pub fn num_batches(&self) -> usize {
        let cfg = &self.shared.cfg;
        let n = self.shared.dataset.len();
        if cfg.drop_last {
            (n / cfg.batch_size).saturating_sub(cfg.rank).div_ceil(cfg.world_size)
        } else {
            let per = n.div_ceil(cfg.world_size);
            let mine = ((cfg.rank + 1) * per).min(n).saturating_sub(cfg.rank * per);
            mine.div_ceil(cfg.batch_size)
        }
    }

    /// Micro-batches per epoch over all ranks: the training protocols' schedules and step counts are functions of
    /// it, not of the rank's share, so they do not depend on the world size.
    pub fn global_batches(&self) -> usize {
        let cfg = &self.shared.cfg;
        let n = self.shared.dataset.len();
        if cfg.drop_last {
            n / cfg.batch_size
        } else {
            n.div_ceil(cfg.batch_size)
        }
    }

    /// Decodes and transforms one sample as the loader would in `epoch`: CHW f32.
    pub fn load_sample(&self, index: usize, epoch: u64) -> Result<Vec<f32>> {
        let (h, w) = self.shared.out_hw;
        let mut out = vec![0f32; 3 * h as usize * w as usize];
        self.shared.process(index, epoch, &mut out)?;
        Ok(out)
    }

    /// The batches of `epoch`.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.iter_from(epoch, 0)
    }

    /// The batches `start_batch..` of `epoch`, identical to those of an uninterrupted epoch.
    pub fn iter_from(&self, epoch: u64, start_batch: usize) -> EpochIter {
        let shared = self.shared.clone();
        let indices = self.epoch_indices(epoch);
        let nb = self.num_batches();
        let bs = shared.cfg.batch_size;
        let (tx, rx) = bounded(shared.cfg.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("lmim-data-producer".into())
            .spawn(move || {
                if let Some(d) = shared.cfg.pin_device.filter(|d| d.is_cuda()) {
                    if let Err(e) = crate::device::bind_thread(d) {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
                for k in start_batch..nb {
                    if stop2.load(Ordering::Relaxed) {
                        break;
                    }
                    let ids = &indices[k * bs..((k + 1) * bs).min(indices.len())];
                    match shared.make_batch(k, ids, epoch) {
                        Ok(None) => continue,
                        Ok(Some(b)) => {
                            if tx.send(Ok(b)).is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            break;
                        }
                    }
                }
            })
            .expect("cannot spawn the data loader thread");
        EpochIter { rx: Some(rx), stop, handle: Some(handle) }
    }
}

impl Shared {
    fn process(&self, index: usize, epoch: u64, out: &mut [f32]) -> Result<()> {
        let path = &self.dataset.samples[index].0;
        let mut rng = sample_rng(self.cfg.seed, epoch, index);
        // A file, or a member of a tar shard.
        let bytes = self.dataset.read_bytes(index)?;
        if self.cfg.dct_scaling {
            return self.transform.apply_encoded(&bytes, true, &mut rng, out).map_err(|r| Error::data(path, r));
        }
        let img = decode_image(&bytes).map_err(|r| Error::data(path, r))?;
        self.transform.apply(img, &mut rng, out).map_err(|r| Error::data(path, r))
    }

    /// One batch, or None when every sample of it was skipped.
    fn make_batch(&self, k: usize, ids: &[usize], epoch: u64) -> Result<Option<Batch>> {
        let (h, w) = self.out_hw;
        let per = 3 * h as usize * w as usize;
        let b = ids.len();
        let images = Tensor::empty([b as i64, 3, h as i64, w as i64], (Kind::Float, Device::Cpu));
        // SAFETY: `images` is a fresh contiguous CPU f32 tensor of b*per values owned here; the slices are
        // disjoint and the pool returns before `images` is used again.
        let base = images.data_ptr() as usize;
        let results: Vec<Result<()>> = self.pool.install(|| {
            ids.par_iter()
                .enumerate()
                .map(|(j, &idx)| {
                    let out = unsafe { std::slice::from_raw_parts_mut((base as *mut f32).add(j * per), per) };
                    self.process(idx, epoch, out)
                })
                .collect()
        });
        let mut keep = Vec::with_capacity(b);
        for (j, r) in results.into_iter().enumerate() {
            match r {
                Ok(()) => keep.push(j),
                Err(e) if self.cfg.strict => return Err(e),
                Err(e) => {
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                    if self.warned.lock().unwrap_or_else(|e| e.into_inner()).insert(ids[j]) && !self.cfg.quiet {
                        eprintln!("warning: skipped: {e}");
                    }
                }
            }
        }
        if keep.is_empty() {
            // A whole batch unreadable is how a removed or unmounted data folder shows: name it, not a file.
            if !self.dataset.dir.is_dir() {
                return Err(Error::data(&self.dataset.dir, "the data folder is gone (removed or unmounted during the run)"));
            }
            return Ok(None);
        }
        let skipped = b - keep.len();
        let mut images = if skipped > 0 {
            let k64: Vec<i64> = keep.iter().map(|&j| j as i64).collect();
            images.index_select(0, &Tensor::from_slice(&k64))
        } else {
            images
        };
        let indices: Vec<usize> = keep.iter().map(|&j| ids[j]).collect();
        let labels: Vec<i64> = indices.iter().map(|&i| self.dataset.samples[i].1).collect();
        if self.cfg.pin_device.is_some_and(|d| d.is_cuda()) {
            images = crate::device::pinned(&images)?;
        }
        Ok(Some(Batch { images, labels: Tensor::from_slice(&labels), indices, batch: k, skipped }))
    }
}

/// The batches of one epoch in order. Dropping it stops the producer.
pub struct EpochIter {
    rx: Option<Receiver<Result<Batch>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks a producer waiting to send.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{decode_threads_for, Cpus};

    #[test]
    fn decode_threads_follow_the_launchers_share() {
        let c = |mask, online, usable, per_task| Cpus { mask, online, usable, per_task };
        // srun --ntasks-per-node=8 --cpus-per-task=12 on a 96-core node: each task's mask is its 12 CPUs.
        assert_eq!(decode_threads_for(c(12, 96, 12, Some(12)), 8, false).threads, 12);
        // The same without SLURM_CPUS_PER_TASK (12 x 8 ranks fit the node: per-task masks).
        assert_eq!(decode_threads_for(c(12, 96, 12, None), 8, false).threads, 12);
        // torchrun on a bare node: every rank sees all 96, shared by the 8 local ranks.
        assert_eq!(decode_threads_for(c(96, 96, 96, None), 8, true).threads, 12);
        // torchrun inside a partial allocation (a 32-CPU cpuset of a 96-core node): the 32 shared by 8.
        assert_eq!(decode_threads_for(c(32, 96, 32, None), 8, true).threads, 4);
        // srun without per-task binding: every task's mask is the job's 48 CPUs, each task asked for 6.
        assert_eq!(decode_threads_for(c(48, 96, 48, Some(6)), 8, false).threads, 6);
        // A shared mask whose share is above the task's: capped by SLURM_CPUS_PER_TASK.
        let d = decode_threads_for(c(96, 96, 96, Some(4)), 8, false);
        assert_eq!(d.threads, 4);
        assert!(d.why.contains("SLURM_CPUS_PER_TASK=4"), "{}", d.why);
        // A container's cpuset of 16 CPUs on a 96-core node, one rank / 8 ranks under a plain launcher.
        assert_eq!(decode_threads_for(c(16, 96, 16, None), 1, false).threads, 16);
        assert_eq!(decode_threads_for(c(16, 96, 16, None), 8, false).threads, 2);
        // A cgroup quota below the mask (16 CPUs' worth on a 96-core node, one rank).
        assert_eq!(decode_threads_for(c(96, 96, 16, None), 1, false).threads, 16);
        // More ranks than CPUs still decode on one thread each.
        assert_eq!(decode_threads_for(c(4, 4, 4, None), 8, true).threads, 1);
        assert!(decode_threads_for(c(12, 96, 12, Some(12)), 8, false).why.contains("affinity mask holds 12 of the node's 96"));
        assert!(decode_threads_for(c(96, 96, 96, None), 8, true).why.contains("shared by 8 ranks"));
    }
}
