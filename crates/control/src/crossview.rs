//! Cross-view: the guest's processes as its own agent reports them (`/proc`, inside the guest)
//! against the kernel's task list read from outside. A rootkit that unlinks a task from the list
//! leaves it in `/proc` (the agent sees it, introspection does not); one that filters `/proc`
//! leaves it in the list (introspection sees it, the agent does not). Either is flagged.
//!
//! The two views cannot be taken at one instant: the agent is asked before and after each
//! introspection, and a process counts as present for the agent only if both of its answers
//! agree, so a process that starts or ends in between is not flagged. A process introspection
//! sees that the agent misses must be missed in every round.

use std::collections::{BTreeMap, BTreeSet};

use bulwark_agent::proto::Proc;
use bulwark_channel::GuestProcess;
use serde::Serialize;

/// A process one view has and the other lacks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Flagged {
    pub pid: i64,
    pub comm: String,
    /// What has it: `agent` or `introspection`.
    pub seen_by: &'static str,
}

/// One round: the agent's list, introspection's, and the agent's again.
pub struct Round<'a> {
    pub before: &'a [Proc],
    pub kernel: &'a [GuestProcess],
    pub after: &'a [Proc],
}

/// What the rounds disagree on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CrossView {
    /// Processes the agent reported (last round).
    pub agent: usize,
    /// Processes on the kernel's task list (last round; the idle task not counted).
    pub introspected: usize,
    /// In the agent's `/proc` throughout a round but not on the kernel's task list: unlinked.
    pub missing_from_task_list: Vec<Flagged>,
    /// On the task list in every round but in none of the agent's answers: hidden from `/proc`.
    pub hidden_from_agent: Vec<Flagged>,
}

/// Compares the rounds (at least one).
pub fn compare(rounds: &[Round<'_>]) -> CrossView {
    let mut out = CrossView::default();
    // pid -> comm, for the agent-only ones (flagged in any round: the task list lacks them while
    // /proc showed them before and after).
    let mut unlinked: BTreeMap<i64, String> = BTreeMap::new();
    // pid -> comm, for the kernel-only ones; kept only if every round flags them.
    let mut hidden: Option<BTreeMap<(i64, u64), String>> = None;
    for r in rounds {
        let pids = |l: &[Proc]| l.iter().map(|p| i64::from(p.pid)).collect::<BTreeSet<_>>();
        let (before, after) = (pids(r.before), pids(r.after));
        let kernel: BTreeSet<i64> = r.kernel.iter().map(|p| i64::from(p.pid)).collect();
        for p in r.after {
            let pid = i64::from(p.pid);
            if before.contains(&pid) && !kernel.contains(&pid) {
                unlinked.insert(pid, p.comm.clone());
            }
        }
        let this: BTreeMap<(i64, u64), String> = r
            .kernel
            .iter()
            .filter(|p| p.pid > 0)
            .filter(|p| {
                let pid = i64::from(p.pid);
                !before.contains(&pid) && !after.contains(&pid)
            })
            .map(|p| ((i64::from(p.pid), p.start_time_ns), p.comm.clone()))
            .collect();
        hidden = Some(match hidden {
            None => this,
            Some(prev) => prev
                .into_iter()
                .filter(|(k, _)| this.contains_key(k))
                .collect(),
        });
        out.agent = r.after.len();
        out.introspected = r.kernel.iter().filter(|p| p.pid > 0).count();
    }
    out.missing_from_task_list = unlinked
        .into_iter()
        .map(|(pid, comm)| Flagged {
            pid,
            comm,
            seen_by: "agent",
        })
        .collect();
    out.hidden_from_agent = hidden
        .unwrap_or_default()
        .into_iter()
        .map(|((pid, _), comm)| Flagged {
            pid,
            comm,
            seen_by: "introspection",
        })
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(pids: &[(u32, &str)]) -> Vec<Proc> {
        pids.iter()
            .map(|&(pid, comm)| Proc {
                pid,
                ppid: 1,
                uid: 0,
                comm: comm.into(),
                state: b'S',
            })
            .collect()
    }

    fn kernel(pids: &[(i32, &str, u64)]) -> Vec<GuestProcess> {
        pids.iter()
            .map(|&(pid, comm, start)| GuestProcess {
                pid,
                ppid: 1,
                comm: comm.into(),
                uid: 0,
                state: 1,
                start_time_ns: start,
                kernel_thread: false,
                task: 0,
            })
            .collect()
    }

    #[test]
    fn views_that_agree_flag_nothing_and_churn_is_not_a_rootkit() {
        let a = agent(&[(1, "init"), (50, "sh"), (60, "dd")]);
        // dd ended and another began while introspection read; pid 0 is the idle task.
        let k = kernel(&[
            (0, "swapper/0", 0),
            (1, "init", 1),
            (50, "sh", 5),
            (61, "dd", 9),
        ]);
        let b = agent(&[(1, "init"), (50, "sh"), (62, "dd")]);
        let k2 = kernel(&[
            (0, "swapper/0", 0),
            (1, "init", 1),
            (50, "sh", 5),
            (62, "dd", 10),
        ]);
        let v = compare(&[
            Round {
                before: &a,
                kernel: &k,
                after: &b,
            },
            Round {
                before: &b,
                kernel: &k2,
                after: &b,
            },
        ]);
        assert!(v.missing_from_task_list.is_empty(), "{v:?}");
        assert!(v.hidden_from_agent.is_empty(), "{v:?}");
        assert_eq!((v.agent, v.introspected), (3, 3));
    }

    #[test]
    fn an_unlinked_task_and_a_task_hidden_from_proc_are_flagged() {
        // pid 70 is in /proc but not on the task list; pid 80 the other way, in both rounds.
        let a = agent(&[(1, "init"), (70, "miner")]);
        let k1 = kernel(&[(1, "init", 1), (80, "backdoor", 7)]);
        let k2 = kernel(&[(1, "init", 1), (80, "backdoor", 7), (90, "short", 8)]);
        let rounds = [
            Round {
                before: &a,
                kernel: &k1,
                after: &a,
            },
            Round {
                before: &a,
                kernel: &k2,
                after: &a,
            },
        ];
        let v = compare(&rounds);
        assert_eq!(
            v.missing_from_task_list,
            [Flagged {
                pid: 70,
                comm: "miner".into(),
                seen_by: "agent"
            }]
        );
        // 90 showed in one round only: not flagged.
        assert_eq!(
            v.hidden_from_agent,
            [Flagged {
                pid: 80,
                comm: "backdoor".into(),
                seen_by: "introspection"
            }]
        );
    }
}
