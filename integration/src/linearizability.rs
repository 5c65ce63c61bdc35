//! A linearizability checker for a key-value register, after Wing and Gong
//! with Lowe's memoisation (the algorithm Porcupine uses). Histories are
//! split by key, since keys are independent registers.

use std::collections::{BTreeMap, HashSet};

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Set the register.
    Write(String),
    /// Observed this value (None: the key was absent).
    Read(Option<String>),
}

/// One operation in a history: when it was called and when it returned.
/// `ret: None` means the outcome is unknown (e.g. a timeout): the operation
/// may have taken effect at any point after its call, or never.
#[derive(Clone, Debug)]
pub struct Event {
    pub key: String,
    pub op: Op,
    pub call: u64,
    pub ret: Option<u64>,
}

/// The search gives up after this many steps per key and reports it.
const MAX_STEPS: u64 = 50_000_000;

/// The first key whose history is not linearizable, if any.
///
/// Written values must be unique per key. A write with an unknown outcome
/// whose value no read observed is dropped first: placing it after every
/// other operation is always a valid choice, so it cannot change the answer,
/// and keeping it would only widen the search.
pub fn check(history: &[Event]) -> Result<(), String> {
    let observed: HashSet<(&str, &str)> = history
        .iter()
        .filter_map(|e| match &e.op {
            Op::Read(Some(v)) if e.ret.is_some() => Some((e.key.as_str(), v.as_str())),
            _ => None,
        })
        .collect();
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in history {
        match &e.op {
            // A read with no answer tells nothing.
            Op::Read(_) if e.ret.is_none() => continue,
            Op::Write(v) if e.ret.is_none() && !observed.contains(&(e.key.as_str(), v.as_str())) => continue,
            _ => {}
        }
        by_key.entry(&e.key).or_default().push(e);
    }
    for (key, evs) in by_key {
        match check_register(&evs) {
            Some(true) => {}
            Some(false) => {
                return Err(format!(
                    "history of key {key} ({} operations) is not linearizable",
                    evs.len()
                ))
            }
            None => {
                return Err(format!(
                    "history of key {key} ({} operations): search exceeded {MAX_STEPS} steps",
                    evs.len()
                ))
            }
        }
    }
    Ok(())
}

fn step(state: &Option<String>, op: &Op) -> Option<Option<String>> {
    match op {
        Op::Write(v) => Some(Some(v.clone())),
        Op::Read(r) => (r == state).then(|| state.clone()),
    }
}

fn check_register(ops: &[&Event]) -> Option<bool> {
    // Entries: calls and returns, in time order (calls first on ties, which
    // treats touching operations as concurrent).
    let mut entries: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, e) in ops.iter().enumerate() {
        entries.push((e.call, false, i));
        entries.push((e.ret.unwrap_or(u64::MAX), true, i));
    }
    entries.sort_by_key(|(t, is_ret, i)| (*t, *is_ret, *i));
    let n = entries.len();
    // Doubly linked list over entries; index n is the head sentinel.
    let mut next: Vec<usize> = (1..=n).collect();
    next.push(if n == 0 { n + 1 } else { 0 });
    let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { n } else { i - 1 }).collect();
    prev.push(n);
    let end = n + 1;
    if n > 0 {
        next[n - 1] = end;
    }
    let mut ret_of = vec![0usize; ops.len()];
    for (idx, (_, is_ret, i)) in entries.iter().enumerate() {
        if *is_ret {
            ret_of[*i] = idx;
        }
    }
    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    let mut state: Option<String> = None;
    let mut stack: Vec<(usize, Option<String>)> = Vec::new();

    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, x: usize| {
        let (p, nx) = (prev[x], next[x]);
        next[p] = nx;
        if nx != end {
            prev[nx] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, x: usize| {
        let (p, nx) = (prev[x], next[x]);
        next[p] = x;
        if nx != end {
            prev[nx] = x;
        }
    };

    let mut cur = next[n];
    let mut steps = 0u64;
    loop {
        steps += 1;
        if steps > MAX_STEPS {
            return None;
        }
        if next[n] == end {
            return Some(true);
        }
        let (is_ret, op) = if cur == end {
            (true, usize::MAX)
        } else {
            (entries[cur].1, entries[cur].2)
        };
        if is_ret {
            // Nothing more can be linearized here, or an operation returned
            // before it could be: undo the last choice and try the next.
            let Some((c, s)) = stack.pop() else { return Some(false) };
            let op = entries[c].2;
            state = s;
            linearized[op / 64] &= !(1 << (op % 64));
            relink(&mut next, &mut prev, ret_of[op]);
            relink(&mut next, &mut prev, c);
            cur = next[c];
            continue;
        }
        if let Some(new_state) = step(&state, &ops[op].op) {
            let mut bits = linearized.clone();
            bits[op / 64] |= 1 << (op % 64);
            if cache.insert((bits.clone(), new_state.clone())) {
                stack.push((cur, state.clone()));
                state = new_state;
                linearized = bits;
                unlink(&mut next, &mut prev, cur);
                unlink(&mut next, &mut prev, ret_of[op]);
                cur = next[n];
                continue;
            }
        }
        cur = next[cur];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(v: &str, call: u64, ret: Option<u64>) -> Event {
        Event {
            key: "k".into(),
            op: Op::Write(v.into()),
            call,
            ret,
        }
    }
    fn r(v: Option<&str>, call: u64, ret: u64) -> Event {
        Event {
            key: "k".into(),
            op: Op::Read(v.map(String::from)),
            call,
            ret: Some(ret),
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        assert!(check(&[
            r(None, 0, 1),
            w("a", 2, Some(3)),
            r(Some("a"), 4, 5),
            w("b", 6, Some(7)),
            r(Some("b"), 8, 9)
        ])
        .is_ok());
    }

    #[test]
    fn stale_read_after_a_completed_write_is_not() {
        assert!(check(&[w("a", 0, Some(1)), w("b", 2, Some(3)), r(Some("a"), 4, 5)]).is_err());
        assert!(check(&[w("a", 0, Some(1)), r(None, 2, 3)]).is_err());
    }

    #[test]
    fn concurrent_operations_may_order_either_way() {
        // The read overlaps the write: old or new value are both fine.
        assert!(check(&[w("a", 0, Some(1)), w("b", 2, Some(10)), r(Some("a"), 3, 4)]).is_ok());
        assert!(check(&[w("a", 0, Some(1)), w("b", 2, Some(10)), r(Some("b"), 3, 4)]).is_ok());
        // But once a read saw the new value, a later read may not see the old one.
        assert!(check(&[
            w("a", 0, Some(1)),
            w("b", 2, Some(10)),
            r(Some("b"), 3, 4),
            r(Some("a"), 5, 6)
        ])
        .is_err());
    }

    #[test]
    fn unknown_outcomes_may_or_may_not_have_happened() {
        assert!(check(&[w("a", 0, Some(1)), w("b", 2, None), r(Some("a"), 3, 4)]).is_ok());
        // Many unobserved unknown writes do not slow the search down.
        let mut h = vec![w("a", 0, Some(1))];
        for i in 0..500 {
            h.push(w(&format!("lost{i}"), 2 + i, None));
        }
        h.push(r(Some("a"), 1000, 1001));
        assert!(check(&h).is_ok());
        assert!(check(&[w("a", 0, Some(1)), w("b", 2, None), r(Some("b"), 3, 4)]).is_ok());
        // A value never written cannot be read.
        assert!(check(&[w("a", 0, Some(1)), r(Some("z"), 3, 4)]).is_err());
    }

    #[test]
    fn keys_are_independent() {
        let mut h = vec![w("a", 0, Some(1))];
        h.push(Event {
            key: "other".into(),
            op: Op::Read(None),
            call: 2,
            ret: Some(3),
        });
        h.push(r(Some("a"), 4, 5));
        assert!(check(&h).is_ok());
    }

    #[test]
    fn larger_concurrent_history() {
        // 8 writers and readers overlapping in a sliding window; generated
        // from a sequential execution, so it must be linearizable.
        let mut h = Vec::new();
        let mut value = None::<String>;
        for i in 0..200u64 {
            let t = i * 10;
            if i % 3 == 0 {
                let v = format!("v{i}");
                h.push(w(&v, t, Some(t + 25)));
                value = Some(v);
            } else {
                h.push(Event {
                    key: "k".into(),
                    op: Op::Read(value.clone()),
                    call: t,
                    ret: Some(t + 5),
                });
            }
        }
        // Each read happened right after the write before it took effect at
        // its call time, which is inside every write's interval.
        assert!(check(&h).is_ok());
    }
}
