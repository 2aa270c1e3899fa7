//! The k-NN of the ADE20K segmentation probe (CAPI's `KNNClassifier`, facebookresearch/capi:eval_segmentation.py)
//! at the scale of the full training split: the bank cut into `knn_chunk` rows as CAPI cuts it, each chunk held
//! on the device, or on the host and copied over for its search when the device cannot hold it, and the chunks
//! dealt over the ranks of a job.
//!
//! CAPI's order of work is query batch, then bank chunk: every query batch meets every chunk. Here it is chunk,
//! then query batch, so that a chunk held on the host crosses to the device once per search, not once per query
//! batch; each query keeps its `k` smallest distances so far, merged with each chunk's `min(k, chunk)` smallest
//! in chunk order. The neighbours are CAPI's (the `k` smallest of the chunks' smallest); only among exactly equal
//! distances may a different row be picked, as `topk` gives no order among equals either.
//!
//! Under a launcher rank 0 drives and the other ranks follow its commands, sent as broadcasts: load a bank (its
//! chunks broadcast, each kept by rank `chunk % ranks`), search (the queries broadcast; every rank's `k` nearest
//! over its chunks gathered to rank 0 and merged in rank order), stop. Rank 0 alone holds the labels and votes.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::seg::{Distance, INFERENCE_BS};
use crate::dist::World;
use crate::error::{Error, Result};

/// Where the bank is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BankPlace {
    /// On the device as far as it fits with room for a search block, the rest on the host.
    Auto,
    Device,
    /// On the host, each chunk copied to the device for its search.
    Host,
}

/// Query rows per broadcast, and per gather of the ranks' neighbours: bounds each message.
const QUERY_BLOCK: i64 = 65_536;

/// The commands rank 0 sends.
const STOP: i64 = 0;
const LOAD: i64 = 1;
const SEARCH: i64 = 2;

/// What the search needs to know of the protocol.
#[derive(Debug, Clone, Copy)]
pub struct SearchOptions {
    pub chunk: i64,
    pub dtype: Kind,
    pub place: BankPlace,
    pub device: Device,
}

/// This rank's part of a bank.
struct Bank {
    /// This rank's chunks: their first row and their rows in the search dtype.
    chunks: Vec<(i64, Tensor)>,
    /// Every row's pixel labels `[N, P]` u8 (rank 0 only).
    labels: Option<Tensor>,
    rows: i64,
    dim: i64,
    chunks_total: i64,
    on_device: usize,
}

/// The search of one job: rank 0 calls [`Search::load`] and [`Search::predict`]; the other ranks call
/// [`Search::follow`]. Dropped on rank 0, it releases the followers.
pub struct Search<'a> {
    world: &'a World,
    opts: SearchOptions,
    bank: Option<Bank>,
    stopped: bool,
}

/// How a search was run, for the record.
#[derive(Debug, Clone, Serialize)]
pub struct SearchReport {
    pub ranks: usize,
    pub bank_rows: i64,
    pub chunks: i64,
    /// Chunks of rank 0 held on the device (`chunks_on_host` the others).
    pub chunks_on_device: usize,
    pub chunks_on_host: usize,
}

impl<'a> Search<'a> {
    pub fn new(world: &'a World, opts: SearchOptions) -> Search<'a> {
        Search { world, opts, bank: None, stopped: false }
    }

    fn command(&self, cmd: [i64; 4]) -> Result<[i64; 4]> {
        let t = Tensor::from_slice(&cmd);
        self.world.broadcast(std::slice::from_ref(&t), 0, "the k-NN search's command")?;
        let v = Vec::<i64>::try_from(&t).map_err(Error::Torch)?;
        Ok([v[0], v[1], v[2], v[3]])
    }

    /// Rank 0: makes `features` (`[N, D]` f32) with their pixel `labels` the bank.
    pub fn load(&mut self, features: &Tensor, labels: &Tensor) -> Result<()> {
        let (rows, dim) = (features.size()[0], features.size()[1]);
        self.command([LOAD, rows, dim, 0])?;
        let mut bank = self.receive_bank(rows, dim, Some(features))?;
        let on_device = bank.on_device == bank.chunks.len() && !bank.chunks.is_empty();
        bank.labels = Some(if on_device { labels.to_device(self.opts.device) } else { labels.shallow_clone() });
        self.bank = Some(bank);
        Ok(())
    }

    /// Every rank: its chunks of the bank rank 0 broadcasts (`features` on rank 0).
    fn receive_bank(&mut self, rows: i64, dim: i64, features: Option<&Tensor>) -> Result<Bank> {
        // The previous bank goes first, so that its device memory is free for this one.
        self.bank = None;
        let (w, opts) = (self.world, self.opts);
        let chunk = opts.chunk.max(1);
        let chunks_total = (rows + chunk - 1) / chunk;
        let mut chunks = Vec::new();
        let mut room = Room::new(opts, chunk, dim)?;
        for i in 0..chunks_total {
            let (start, len) = (i * chunk, chunk.min(rows - i * chunk));
            let rows_f32 = match features {
                Some(f) => f.narrow(0, start, len).to_kind(Kind::Float).contiguous(),
                None => Tensor::zeros([len, dim], (Kind::Float, Device::Cpu)),
            };
            w.broadcast(std::slice::from_ref(&rows_f32), 0, "the k-NN bank")?;
            if i % w.size as i64 == w.rank as i64 {
                chunks.push((start, room.place(rows_f32.to_kind(opts.dtype))?));
            }
        }
        Ok(Bank { chunks, labels: None, rows, dim, chunks_total, on_device: room.on_device })
    }

    /// The other ranks: serve rank 0's commands until it stops.
    pub fn follow(&mut self) -> Result<()> {
        loop {
            let [cmd, a, b, c] = self.command([STOP; 4])?;
            match cmd {
                LOAD => {
                    let bank = self.receive_bank(a, b, None)?;
                    self.bank = Some(bank);
                }
                SEARCH => {
                    let distance = if c == 0 { Distance::Cosine } else { Distance::L2 };
                    self.search(a, b, distance, None)?;
                }
                _ => return Ok(()),
            }
        }
    }

    /// Rank 0: releases the followers.
    pub fn stop(&mut self) -> Result<()> {
        if !std::mem::replace(&mut self.stopped, true) && self.world.is_distributed() {
            self.command([STOP; 4])?;
        }
        Ok(())
    }

    /// Rank 0: CAPI's `predict` of `queries` (`[Q, D]` f32) with `k` neighbours: each pixel the mode of the
    /// neighbours' labels at that pixel, `[Q, P]` u8 on the CPU.
    pub fn predict(&mut self, queries: &Tensor, k: i64, distance: Distance) -> Result<Tensor> {
        let rows = self.bank.as_ref().map_or(0, |b| b.rows);
        if rows < k {
            return Err(Error::option("knn_k", format!("k = {k} is more than the {rows} training patches left to search")));
        }
        let q = queries.size()[0];
        self.command([SEARCH, q, k, if distance == Distance::Cosine { 0 } else { 1 }])?;
        let ids = self.search(q, k, distance, Some(queries))?.expect("rank 0 gets the neighbours");
        Ok(self.vote(&ids))
    }

    /// Every rank: the `k` nearest bank rows of each query over this rank's chunks, merged on rank 0 with the
    /// other ranks': `[Q, k]` row ids on rank 0, None elsewhere.
    fn search(&self, q: i64, k: i64, distance: Distance, queries: Option<&Tensor>) -> Result<Option<Tensor>> {
        let _g = tch::no_grad_guard();
        let opts = self.opts;
        let bank = self.bank.as_ref().ok_or_else(|| Error::Dist("a k-NN search command before its bank was loaded".into()))?;
        let qs = self.receive_queries(q, bank.dim, queries)?;
        let batches: Vec<(i64, i64)> = (0..q).step_by(INFERENCE_BS as usize).map(|s| (s, INFERENCE_BS.min(q - s))).collect();
        let mut best: Vec<Option<(Tensor, Tensor)>> = batches.iter().map(|_| None).collect();
        for (start, rows) in &bank.chunks {
            let keys = rows.to_device(opts.device);
            for (slot, &(s, n)) in best.iter_mut().zip(&batches) {
                let d = cdist(distance, &qs.narrow(0, s, n), &keys);
                let (dist, idx) = d.topk(k.min(d.size()[1]), -1, false, true);
                let found = (dist, idx + *start);
                *slot = Some(match slot.take() {
                    None => found,
                    Some(prev) => merge(&[prev, found], k),
                });
            }
        }
        let mine: Vec<(Tensor, Tensor)> = best.into_iter().zip(&batches).map(|(b, &(_, n))| padded(b, n, k, opts.device)).collect();
        let dist = Tensor::cat(&mine.iter().map(|m| m.0.shallow_clone()).collect::<Vec<_>>(), 0);
        let ids = Tensor::cat(&mine.iter().map(|m| m.1.shallow_clone()).collect::<Vec<_>>(), 0);
        if !self.world.is_distributed() {
            return Ok(Some(ids.to_device(Device::Cpu)));
        }
        self.gather_nearest(&dist, &ids, k)
    }

    /// The queries on every rank, on the device in the search dtype (broadcast from rank 0 in blocks).
    fn receive_queries(&self, q: i64, dim: i64, queries: Option<&Tensor>) -> Result<Tensor> {
        let mut parts = Vec::new();
        for s in (0..q).step_by(QUERY_BLOCK as usize) {
            let n = QUERY_BLOCK.min(q - s);
            let block = match queries {
                Some(x) => x.narrow(0, s, n).to_kind(Kind::Float).contiguous(),
                None => Tensor::zeros([n, dim], (Kind::Float, Device::Cpu)),
            };
            self.world.broadcast(std::slice::from_ref(&block), 0, "the k-NN queries")?;
            parts.push(block.to_kind(self.opts.dtype).to_device(self.opts.device));
        }
        Ok(Tensor::cat(&parts, 0))
    }

    /// Every rank's `k` nearest gathered to rank 0 in blocks of queries and merged in rank order.
    fn gather_nearest(&self, dist: &Tensor, ids: &Tensor, k: i64) -> Result<Option<Tensor>> {
        let q = ids.size()[0];
        let mut out = Vec::new();
        for s in (0..q).step_by(QUERY_BLOCK as usize) {
            let n = QUERY_BLOCK.min(q - s);
            // f32 on the wire (a bf16 distance is an f32 exactly).
            let d = self.world.all_gather(&dist.narrow(0, s, n).to_kind(Kind::Float).contiguous(), "the k-NN neighbours")?;
            let i = self.world.all_gather(&ids.narrow(0, s, n).contiguous(), "the k-NN neighbours")?;
            if self.world.is_main() {
                let parts: Vec<(Tensor, Tensor)> = d.into_iter().zip(i).collect();
                out.push(merge(&parts, k).1);
            }
        }
        Ok(self.world.is_main().then(|| Tensor::cat(&out, 0)))
    }

    /// CAPI's vote: the neighbours' label rows, then the mode per pixel (the smallest among the most frequent).
    fn vote(&self, ids: &Tensor) -> Tensor {
        let _g = tch::no_grad_guard();
        let labels = self.bank.as_ref().and_then(|b| b.labels.as_ref()).expect("rank 0 holds the labels");
        let (q, k, p) = (ids.size()[0], ids.size()[1], labels.size()[1]);
        let parts: Vec<Tensor> = (0..q)
            .step_by(INFERENCE_BS as usize)
            .map(|s| {
                let n = INFERENCE_BS.min(q - s);
                let idx = ids.narrow(0, s, n).reshape([-1]).to_device(labels.device());
                let neighbours = labels.index_select(0, &idx).view([n, k, p]).to_device(self.opts.device);
                neighbours.mode(1, false).0.to_device(Device::Cpu)
            })
            .collect();
        Tensor::cat(&parts, 0)
    }

    /// How the current bank is held.
    pub fn report(&self) -> SearchReport {
        let b = self.bank.as_ref();
        let mine = b.map_or(0, |b| b.chunks.len());
        let on_device = b.map_or(0, |b| b.on_device);
        SearchReport { ranks: self.world.size, bank_rows: b.map_or(0, |b| b.rows), chunks: b.map_or(0, |b| b.chunks_total), chunks_on_device: on_device, chunks_on_host: mine - on_device }
    }
}

impl Drop for Search<'_> {
    fn drop(&mut self) {
        if self.world.is_main() && !self.stopped {
            let _ = self.stop();
        }
    }
}

/// The device memory the bank may take: each chunk goes to the device while it and a search block fit there
/// (tried, as the caching allocator knows best), the rest stays on the host.
struct Room {
    opts: SearchOptions,
    /// Held while the bank is placed, so that the last chunks do not take the search's working memory.
    _reserve: Option<Tensor>,
    full: bool,
    on_device: usize,
}

impl Room {
    fn new(opts: SearchOptions, chunk: i64, dim: i64) -> Result<Room> {
        let mut room = Room { opts, _reserve: None, full: opts.place == BankPlace::Host, on_device: 0 };
        if opts.device.is_cuda() && opts.place == BankPlace::Auto {
            // A block of distances and its top-k, and the queries' copy: what one search step takes.
            let bytes = INFERENCE_BS * chunk * 4 * 3 + QUERY_BLOCK * dim * 4 * 2;
            match Tensor::f_empty([bytes], (Kind::Uint8, opts.device)) {
                Ok(t) => room._reserve = Some(t),
                Err(_) => room.full = true,
            }
        }
        Ok(room)
    }

    fn place(&mut self, rows: Tensor) -> Result<Tensor> {
        if self.full {
            return Ok(rows);
        }
        match rows.f_to_device(self.opts.device) {
            Ok(t) => {
                self.on_device += 1;
                Ok(t)
            }
            Err(e) if self.opts.place == BankPlace::Auto => {
                eprintln!("seg: the k-NN bank does not fit on {:?} beside a search block ({}); the rest of it is held on the host", self.opts.device, first_line(&e.to_string()));
                self.full = true;
                Ok(rows)
            }
            Err(e) => {
                Err(Error::option("knn_bank", format!("\"device\": the bank does not fit on {:?} ({}); \"auto\" holds what does not fit on the host", self.opts.device, first_line(&e.to_string()))))
            }
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// CAPI's `_cdist`.
fn cdist(distance: Distance, a: &Tensor, b: &Tensor) -> Tensor {
    match distance {
        Distance::L2 => Tensor::cdist(a, b, 2.0, None::<i64>),
        Distance::Cosine => {
            let an = a / a.linalg_norm(2.0, [-1i64].as_slice(), false, None::<Kind>).unsqueeze(1);
            let bn = b / b.linalg_norm(2.0, [-1i64].as_slice(), false, None::<Kind>).unsqueeze(1);
            1.0 - an.mm(&bn.transpose(0, 1))
        }
    }
}

/// The `k` smallest of the candidates (distances, row ids) side by side, in their order.
fn merge(parts: &[(Tensor, Tensor)], k: i64) -> (Tensor, Tensor) {
    let d = Tensor::cat(&parts.iter().map(|p| p.0.shallow_clone()).collect::<Vec<_>>(), 1);
    let i = Tensor::cat(&parts.iter().map(|p| p.1.shallow_clone()).collect::<Vec<_>>(), 1);
    let (dist, pick) = d.topk(k.min(d.size()[1]), -1, false, true);
    (dist, i.gather(1, &pick, false))
}

/// `k` columns: a rank with fewer than `k` rows (or none) pads with infinite distances and id -1, never picked
/// while the job's bank has `k` rows.
fn padded(best: Option<(Tensor, Tensor)>, n: i64, k: i64, device: Device) -> (Tensor, Tensor) {
    let (d, i) = best.unwrap_or_else(|| (Tensor::zeros([n, 0], (Kind::Float, device)), Tensor::zeros([n, 0], (Kind::Int64, device))));
    let have = d.size()[1];
    if have == k {
        return (d, i);
    }
    let pad_d = Tensor::full([n, k - have], f64::INFINITY, (d.kind(), d.device()));
    let pad_i = Tensor::full([n, k - have], -1i64, (Kind::Int64, i.device()));
    (Tensor::cat(&[d, pad_d], 1), Tensor::cat(&[i, pad_i], 1))
}
