//! Where a process sits in a job, read from its launcher's environment, with the variables PyTorch's own
//! launchers set (torch/distributed/run.py, torch/distributed/elastic/agent/server/api.py) and Slurm's
//! (`srun`: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST).
use crate::error::{Error, Result};

/// Who started the processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// One process, no launcher.
    Single,
    /// torchrun (torch.distributed.run): its agent serves the TCPStore.
    Torchrun,
    /// `srun`, one task per device.
    Slurm,
    /// RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set by anything else.
    Env,
}

impl Launcher {
    pub fn name(self) -> &'static str {
        match self {
            Launcher::Single => "single",
            Launcher::Torchrun => "torchrun",
            Launcher::Slurm => "slurm",
            Launcher::Env => "env",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub launcher: Launcher,
    /// torchrun's agent already serves the store on MASTER_PORT: every rank connects as a client.
    pub agent_store: bool,
    pub restart_count: u32,
    /// The job this process belongs to (Slurm's `SLURM_JOB_ID.SLURM_STEP_ID`, torchrun's run id), which the
    /// store's port (when none is named) and key prefix derive from, so that two jobs on one node never meet.
    pub job: Option<String>,
    /// What the run's first lines say about a launch that is not what it looks like (a Slurm job's batch step).
    pub note: Option<String>,
}

/// Port of the store when nothing names one (torch.distributed's default).
pub const DEFAULT_PORT: u16 = 29500;

impl LaunchEnv {
    pub fn from_env() -> Result<LaunchEnv> {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Reads the variables through `get` (tests pass a map). Precedence: torchrun, then explicit RANK /
    /// WORLD_SIZE, then Slurm, else a single process.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<LaunchEnv> {
        let num = |k: &str| -> Result<Option<usize>> {
            get(k).map(|v| v.trim().parse::<usize>().map_err(|_| Error::option(k, format!("`{v}` is not a non-negative integer")))).transpose()
        };
        let port = |k: &str| -> Result<Option<u16>> {
            get(k).map(|v| v.trim().parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| Error::option(k, format!("`{v}` is not a port (1-65535)")))).transpose()
        };
        let torchrun = get("TORCHELASTIC_RUN_ID").is_some() || get("TORCHELASTIC_USE_AGENT_STORE").is_some();
        let (launcher, rank, world, local) = if torchrun || get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            let need = |k: &str| num(k)?.ok_or_else(|| Error::option(k, "is not set (RANK and WORLD_SIZE come together)"));
            let l = if torchrun { Launcher::Torchrun } else { Launcher::Env };
            (l, need("RANK")?, need("WORLD_SIZE")?, num("LOCAL_RANK")?.unwrap_or(0))
        } else if let (Some(r), Some(n)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
            if !in_slurm_step(&get) {
                // sbatch runs the script once, as the job's batch step, with SLURM_PROCID=0 and the job's
                // SLURM_NTASKS: a command there is one process, and waiting for the other tasks would wait forever.
                let note = (n > 1).then(|| format!("this is the batch step of Slurm job {} (no srun): running as one process, not as its {n} tasks; start the command with `srun` to run on every task", get("SLURM_JOB_ID").unwrap_or_else(|| "?".into())));
                return Ok(LaunchEnv { note, ..LaunchEnv::single() });
            }
            // A step's own task count (srun -n may ask for fewer tasks than the job has).
            (Launcher::Slurm, r, num("SLURM_STEP_NUM_TASKS")?.unwrap_or(n), num("SLURM_LOCALID")?.unwrap_or(0))
        } else {
            return Ok(LaunchEnv::single());
        };
        if world == 0 || rank >= world {
            return Err(Error::option("RANK", format!("rank {rank} is not in 0..{world} (WORLD_SIZE / SLURM_NTASKS)")));
        }
        let master_addr = match (get("MASTER_ADDR"), launcher) {
            (Some(a), _) => a,
            (None, Launcher::Slurm) => {
                let list = get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST")).ok_or_else(|| Error::option("MASTER_ADDR", "is not set and neither is SLURM_JOB_NODELIST"))?;
                expand_nodelist(&list)?.into_iter().next().ok_or_else(|| Error::option("SLURM_JOB_NODELIST", format!("`{list}` names no host")))?
            }
            (None, _) if world == 1 => "127.0.0.1".into(),
            (None, _) => return Err(Error::option("MASTER_ADDR", "is not set: the address of rank 0's host")),
        };
        let job = match launcher {
            Launcher::Slurm => get("SLURM_JOB_ID").map(|j| format!("{j}.{}", get("SLURM_STEP_ID").or_else(|| get("SLURM_STEPID")).unwrap_or_else(|| "0".into()))),
            Launcher::Torchrun => get("TORCHELASTIC_RUN_ID"),
            _ => None,
        };
        let master_port = match port("MASTER_PORT")? {
            Some(p) => p,
            None if launcher == Launcher::Slurm => job.as_deref().map_or(DEFAULT_PORT, job_port),
            None if world == 1 => DEFAULT_PORT,
            None => return Err(Error::option("MASTER_PORT", "is not set: the port of the rendezvous store")),
        };
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        let restart_count = num("TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0) as u32;
        Ok(LaunchEnv { rank, world_size: world, local_rank: local, master_addr, master_port, launcher, agent_store, restart_count, job, note: None })
    }

    fn single() -> LaunchEnv {
        LaunchEnv { rank: 0, world_size: 1, local_rank: 0, master_addr: "127.0.0.1".into(), master_port: DEFAULT_PORT, launcher: Launcher::Single, agent_store: false, restart_count: 0, job: None, note: None }
    }
}

/// The store's port of a Slurm job step that names none: in 20000..60000 (the range Meta's job launchers use),
/// from an FNV-1a hash of the job and step ids, so that two jobs (or two steps of one job) sharing a node do not
/// both ask for 29500, while every task of one step computes the same port.
pub fn job_port(job: &str) -> u16 {
    let h = job.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    (20_000 + h % 40_000) as u16
}

/// Whether this process is a task of a Slurm job step (started by `srun`), not the job's batch script: srun sets
/// SLURM_STEP_ID (SLURM_STEPID in older releases) to the step's number; the batch and extern steps either lack it
/// or carry Slurm's reserved ids (0xfffffffa and above: interactive, batch, extern).
fn in_slurm_step(get: &impl Fn(&str) -> Option<String>) -> bool {
    get("SLURM_STEP_ID").or_else(|| get("SLURM_STEPID")).and_then(|v| v.trim().parse::<u64>().ok()).is_some_and(|id| id < 0xffff_fffa)
}

/// Processes of this job on this node: torchrun's `LOCAL_WORLD_SIZE`, else Slurm's `SLURM_NTASKS_PER_NODE`, else this
/// node's entry of `SLURM_TASKS_PER_NODE` (`2(x3),1`: 2 on nodes 0-2, 1 on node 3; `SLURM_NODEID` picks the entry),
/// else 1.
pub fn local_world_size() -> usize {
    local_world_size_from(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

/// [`local_world_size`] from the variables `get` gives (tests pass a map).
pub fn local_world_size_from(get: impl Fn(&str) -> Option<String>) -> usize {
    let num = |k: &str| get(k).and_then(|v| v.trim().parse::<usize>().ok()).filter(|&n| n > 0);
    if let Some(n) = num("LOCAL_WORLD_SIZE") {
        return n;
    }
    // Outside a step (the batch script) this process is the only one of the job on the node.
    if !in_slurm_step(&get) {
        return 1;
    }
    if let Some(n) = num("SLURM_NTASKS_PER_NODE") {
        return n;
    }
    let node = num("SLURM_NODEID").unwrap_or(0);
    get("SLURM_STEP_TASKS_PER_NODE").or_else(|| get("SLURM_TASKS_PER_NODE")).and_then(|list| tasks_on_node(&list, node)).unwrap_or(1)
}

/// The count for node `node` in Slurm's compressed per-node list (`2(x3),1`).
fn tasks_on_node(list: &str, node: usize) -> Option<usize> {
    let mut seen = 0usize;
    for item in list.split(',') {
        let (count, repeat) = match item.trim().split_once("(x") {
            Some((c, r)) => (c.parse::<usize>().ok()?, r.strip_suffix(')')?.parse::<usize>().ok()?),
            None => (item.trim().parse::<usize>().ok()?, 1),
        };
        seen += repeat;
        if node < seen {
            return (count > 0).then_some(count);
        }
    }
    None
}

/// The CUDA device of a process with local rank `local_rank` that sees `visible` devices: the local rank modulo the
/// visible count, as PyTorch users write `torch.cuda.set_device(local_rank % torch.cuda.device_count())`. Under
/// `srun --gpus-per-task=1` (or any `CUDA_VISIBLE_DEVICES` that shows a task fewer GPUs than the node has) each
/// task sees its own GPU as device 0, so `cuda:LOCAL_RANK` would name a device the process cannot see.
/// `None` without a visible device.
pub fn local_device(local_rank: usize, visible: usize) -> Option<usize> {
    (visible > 0).then(|| local_rank % visible)
}

/// The hosts of a Slurm node list, in order: `node[01-04,07],gpu5,rack[1-2]-n[1-2]` gives node01 .. node04,
/// node07, gpu5, rack1-n1, rack1-n2, rack2-n1, rack2-n2. Ranges keep the zero padding of their first bound.
pub fn expand_nodelist(list: &str) -> Result<Vec<String>> {
    let bad = |why: &str| Error::option("SLURM_JOB_NODELIST", format!("`{list}`: {why}"));
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    let mut items = Vec::new();
    for (i, ch) in list.char_indices() {
        match ch {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if depth < 0 || depth > 1 {
            return Err(bad("unbalanced or nested brackets"));
        }
    }
    if depth != 0 {
        return Err(bad("unbalanced brackets"));
    }
    items.push(&list[start..]);
    for item in items.into_iter().map(str::trim).filter(|s| !s.is_empty()) {
        expand_host(item, &mut out).map_err(|w| bad(&w))?;
    }
    Ok(out)
}

fn expand_host(item: &str, out: &mut Vec<String>) -> std::result::Result<(), String> {
    let Some(open) = item.find('[') else {
        out.push(item.to_string());
        return Ok(());
    };
    let close = item[open..].find(']').map(|c| open + c).ok_or("a `[` without `]`")?;
    let (prefix, ranges, rest) = (&item[..open], &item[open + 1..close], &item[close + 1..]);
    let mut tails = Vec::new();
    expand_host(rest, &mut tails)?;
    for part in ranges.split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| s.trim().parse::<u64>().map_err(|_| format!("`{part}` is not a number or range"));
        let (a, b) = (parse(lo)?, parse(hi)?);
        if b < a || b - a > 100_000 {
            return Err(format!("range `{part}` is empty or too long"));
        }
        let width = lo.trim().len();
        for n in a..=b {
            for t in &tails {
                out.push(format!("{prefix}{n:0width$}{t}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<LaunchEnv> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        LaunchEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn nodelists() {
        assert_eq!(expand_nodelist("node[01-04,07]").unwrap(), ["node01", "node02", "node03", "node04", "node07"]);
        assert_eq!(expand_nodelist("gpu5,node[9-11]").unwrap(), ["gpu5", "node9", "node10", "node11"]);
        assert_eq!(expand_nodelist("r[1-2]-n[1-2]").unwrap(), ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]);
        assert_eq!(expand_nodelist("a-ib,b[008-010]-ib").unwrap(), ["a-ib", "b008-ib", "b009-ib", "b010-ib"]);
        assert!(expand_nodelist("node[1-").is_err());
        assert!(expand_nodelist("node[3-1]").is_err());
        assert!(expand_nodelist("node[x]").is_err());
    }

    #[test]
    fn device_of_a_local_rank() {
        // One GPU per task (srun --gpus-per-task=1): every rank uses its only visible device.
        assert_eq!((0..8).map(|r| local_device(r, 1)).collect::<Vec<_>>(), vec![Some(0); 8]);
        // Four visible on a node of 8 ranks: ranks share them round-robin.
        assert_eq!((0..8).map(|r| local_device(r, 4).unwrap()).collect::<Vec<_>>(), [0, 1, 2, 3, 0, 1, 2, 3]);
        // All eight visible: the local rank itself.
        assert_eq!((0..8).map(|r| local_device(r, 8).unwrap()).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(local_device(3, 0), None);
    }

    #[test]
    fn ranks_on_a_node() {
        let m = |pairs: &[(&str, &str)]| {
            let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            local_world_size_from(|k| m.get(k).cloned())
        };
        assert_eq!(m(&[]), 1);
        assert_eq!(m(&[("LOCAL_WORLD_SIZE", "8"), ("SLURM_NTASKS_PER_NODE", "4")]), 8);
        assert_eq!(m(&[("SLURM_STEP_ID", "0"), ("SLURM_NTASKS_PER_NODE", "4")]), 4);
        assert_eq!(m(&[("SLURM_STEP_ID", "0"), ("SLURM_TASKS_PER_NODE", "2(x3),1")]), 2);
        assert_eq!(m(&[("SLURM_STEP_ID", "0"), ("SLURM_TASKS_PER_NODE", "2(x3),1"), ("SLURM_NODEID", "3")]), 1);
        assert_eq!(m(&[("SLURM_STEP_ID", "0"), ("SLURM_TASKS_PER_NODE", "8"), ("SLURM_NODEID", "0")]), 8);
        assert_eq!(m(&[("SLURM_STEP_ID", "0"), ("SLURM_TASKS_PER_NODE", "junk")]), 1);
        // The step's list wins over the job's (srun -n 2 inside a job of 8 tasks per node).
        assert_eq!(m(&[("SLURM_STEP_ID", "1"), ("SLURM_TASKS_PER_NODE", "8"), ("SLURM_STEP_TASKS_PER_NODE", "2")]), 2);
        // The batch script of a job with 8 tasks per node is one process.
        assert_eq!(m(&[("SLURM_NTASKS_PER_NODE", "8"), ("SLURM_TASKS_PER_NODE", "8")]), 1);
    }

    #[test]
    fn two_slurm_jobs_on_a_node_get_different_ports() {
        let task = |job: &str, step: &str| env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_STEP_ID", step), ("SLURM_JOB_ID", job), ("SLURM_JOB_NODELIST", "n1")]).unwrap();
        let (a, b, a1) = (task("4242", "0"), task("4243", "0"), task("4242", "1"));
        assert!(a.master_port != b.master_port && a.master_port != a1.master_port, "{} {} {}", a.master_port, b.master_port, a1.master_port);
        assert!((20_000..60_000).contains(&a.master_port));
        assert_eq!(a.master_port, task("4242", "0").master_port, "every task of a step computes the same port");
        assert_eq!((a.job.as_deref(), b.job.as_deref()), (Some("4242.0"), Some("4243.0")));
        // MASTER_PORT still wins.
        let named = env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_STEP_ID", "0"), ("SLURM_JOB_ID", "4242"), ("SLURM_JOB_NODELIST", "n1"), ("MASTER_PORT", "1234")]).unwrap();
        assert_eq!(named.master_port, 1234);
    }

    #[test]
    fn launchers() {
        let single = env(&[]).unwrap();
        assert_eq!((single.launcher, single.world_size), (Launcher::Single, 1));
        let t = env(&[("TORCHELASTIC_RUN_ID", "x"), ("TORCHELASTIC_USE_AGENT_STORE", "True"), ("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "3"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1234"), ("TORCHELASTIC_RESTART_COUNT", "2")]).unwrap();
        assert_eq!((t.launcher, t.rank, t.world_size, t.local_rank, t.agent_store, t.restart_count, t.master_port), (Launcher::Torchrun, 3, 8, 3, true, 2, 1234));
        let s = env(&[("SLURM_PROCID", "9"), ("SLURM_NTASKS", "32"), ("SLURM_STEP_ID", "0"), ("SLURM_LOCALID", "1"), ("SLURM_JOB_NODELIST", "gpu[07-10]")]).unwrap();
        assert_eq!((s.launcher, s.rank, s.world_size, s.local_rank, s.master_addr.as_str(), s.master_port), (Launcher::Slurm, 9, 32, 1, "gpu07", DEFAULT_PORT));
        // MASTER_ADDR wins over the node list; explicit RANK/WORLD_SIZE win over Slurm's.
        let s2 = env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_STEPID", "3"), ("SLURM_JOB_NODELIST", "n1"), ("MASTER_ADDR", "10.0.0.1")]).unwrap();
        assert_eq!(s2.master_addr, "10.0.0.1");
        let e = env(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "9")]).unwrap();
        assert_eq!((e.launcher, e.rank, e.world_size), (Launcher::Env, 1, 2));
        assert!(env(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "9")]).is_err());
        assert!(env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "9")]).unwrap_err().to_string().contains("MASTER_ADDR"));
        assert!(env(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err().to_string().contains("RANK"));
        // sbatch's batch step: SLURM_PROCID=0 and the job's 8 tasks, but no step: one process, said so.
        let batch = [("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8"), ("SLURM_JOB_ID", "4242"), ("SLURM_JOB_NODELIST", "gpu01")];
        let b = env(&batch).unwrap();
        assert_eq!((b.launcher, b.world_size), (Launcher::Single, 1));
        assert!(b.note.as_deref().is_some_and(|n| n.contains("batch step of Slurm job 4242") && n.contains("srun")), "{:?}", b.note);
        let b2 = env(&[batch.as_slice(), &[("SLURM_STEP_ID", "4294967291")]].concat()).unwrap();
        assert_eq!(b2.world_size, 1, "the batch step's reserved id is not a step");
        // srun -n 2 inside that job: the step's 2 tasks, not the job's 8.
        let st = env(&[batch.as_slice(), &[("SLURM_STEP_ID", "0"), ("SLURM_STEP_NUM_TASKS", "2")]].concat()).unwrap();
        assert_eq!((st.launcher, st.world_size), (Launcher::Slurm, 2));
        assert!(env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "70000")]).is_err());
    }
}
