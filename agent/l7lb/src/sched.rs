//! A pool's members and how a request is given one: its scheduler, cookie
//! persistence, and members set aside for a while after they fail.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{self, CookieMode, Scheduler};

/// A member that refused a connection is not chosen again for this long
/// (while another is up).
pub const SET_ASIDE: Duration = Duration::from_secs(5);
/// Session cookies learned, at most, per pool; past this the half least
/// recently used is forgotten.
pub const LEARNED_MAX: usize = 100_000;
/// Requests in flight to one member, at most (each holds a connection to
/// it); a member at this is passed over, and a pool whose members all are
/// answers 503.
pub const MEMBER_IN_FLIGHT_MAX: usize = 512;
/// A learned cookie's value longer than this is not remembered.
pub const LEARNED_VALUE_MAX: usize = 256;

pub struct Member {
    pub name: String,
    pub address: SocketAddr,
    pub weight: u32,
    /// Requests in flight (least connections).
    pub active: AtomicUsize,
    /// Set aside until (ms since the pool was made; 0: not).
    down_until_ms: AtomicU64,
    /// What its health checks say (up until a check says otherwise; always
    /// up in a pool without checks).
    pub healthy: AtomicBool,
}

impl Member {
    /// Its health check passed: a connection it refused before no longer
    /// sets it aside.
    pub fn restore(&self) {
        self.down_until_ms.store(0, Ordering::Relaxed);
    }
}

pub struct Pool {
    pub name: String,
    pub scheduler: Scheduler,
    pub cookie: Option<config::Cookie>,
    pub proxy_protocol: Option<config::ProxyProtocol>,
    pub members: Vec<Arc<Member>>,
    cursor: AtomicUsize,
    /// Smooth weighted round robin's current weights.
    current: Mutex<Vec<i64>>,
    /// Learned cookies: the value's keyed hash, its member, and when it
    /// was last used.
    learned: Mutex<HashMap<u64, (usize, u64)>>,
    keys: std::collections::hash_map::RandomState,
    born: Instant,
}

/// What a request carries that persistence and hashing read.
pub struct Key<'a> {
    /// The persistence cookie's value.
    pub cookie: Option<&'a str>,
    /// The value the scheduler hashes (its header's or cookie's).
    pub hash: Option<&'a str>,
}

impl Pool {
    pub fn new(p: &config::Pool) -> Pool {
        Pool {
            name: p.name.clone(),
            scheduler: p.scheduler.clone(),
            cookie: p.cookie.clone(),
            proxy_protocol: p.proxy_protocol,
            members: p
                .members
                .iter()
                .map(|m| {
                    Arc::new(Member {
                        name: m.name.clone(),
                        address: m.address,
                        weight: m.weight,
                        active: AtomicUsize::new(0),
                        down_until_ms: AtomicU64::new(0),
                        healthy: AtomicBool::new(true),
                    })
                })
                .collect(),
            cursor: AtomicUsize::new(0),
            current: Mutex::new(vec![0; p.members.len()]),
            learned: Mutex::new(HashMap::new()),
            keys: std::collections::hash_map::RandomState::new(),
            born: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn up(&self, i: usize) -> bool {
        self.healthy(i) && self.members[i].down_until_ms.load(Ordering::Relaxed) <= self.now_ms()
    }

    /// Healthy, and not at its cap of requests in flight.
    fn healthy(&self, i: usize) -> bool {
        self.members[i].healthy.load(Ordering::Relaxed)
            && self.members[i].active.load(Ordering::Relaxed) < MEMBER_IN_FLIGHT_MAX
    }

    /// Sets a member aside after a failed connection.
    pub fn set_aside(&self, i: usize) {
        self.members[i]
            .down_until_ms
            .store(self.now_ms() + SET_ASIDE.as_millis() as u64, Ordering::Relaxed);
    }

    /// The member for a request: its persistence cookie's, if that member
    /// is up; else the scheduler's among those up (else among the healthy
    /// ones set aside). `skip`: a member that just failed this request.
    /// None: no member passes its health checks.
    pub fn pick(&self, key: &Key, skip: Option<usize>) -> Option<usize> {
        if let (Some(c), Some(v)) = (&self.cookie, key.cookie) {
            let found = match c.mode {
                CookieMode::Insert => self.members.iter().position(|m| m.name == v),
                CookieMode::Learn => {
                    let now = self.now_ms();
                    lock(&self.learned).get_mut(&self.keys.hash_one(v)).map(|(i, t)| {
                        *t = now;
                        *i
                    })
                }
            };
            if let Some(i) = found.filter(|i| *i < self.members.len() && self.up(*i) && Some(*i) != skip) {
                return Some(i);
            }
        }
        let mut eligible: Vec<usize> = (0..self.members.len())
            .filter(|i| self.up(*i) && Some(*i) != skip)
            .collect();
        if eligible.is_empty() {
            eligible = (0..self.members.len())
                .filter(|i| self.healthy(*i) && Some(*i) != skip)
                .collect();
        }
        if eligible.is_empty() {
            return None;
        }
        Some(match (&self.scheduler, key.hash) {
            (Scheduler::HashHeader(_) | Scheduler::HashCookie(_), Some(v)) => self.rendezvous(&eligible, v),
            (Scheduler::WeightedRoundRobin, _) => self.smooth(&eligible),
            (Scheduler::LeastConnections, _) => self.least(&eligible),
            _ => eligible[self.cursor.fetch_add(1, Ordering::Relaxed) % eligible.len()],
        })
    }

    /// nginx's smooth weighted round robin over `eligible`.
    fn smooth(&self, eligible: &[usize]) -> usize {
        let mut cur = lock(&self.current);
        let total: i64 = eligible.iter().map(|i| self.members[*i].weight as i64).sum();
        let mut best = eligible[0];
        for &i in eligible {
            cur[i] += self.members[i].weight as i64;
            if cur[i] > cur[best] {
                best = i;
            }
        }
        cur[best] -= total;
        best
    }

    /// The fewest requests in flight for its weight (the first of equals
    /// after the cursor, so equals share).
    fn least(&self, eligible: &[usize]) -> usize {
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let mut best = eligible[start % eligible.len()];
        for k in 0..eligible.len() {
            let i = eligible[(start + k) % eligible.len()];
            let (a, b) = (&self.members[i], &self.members[best]);
            // a.active / a.weight < b.active / b.weight
            if (a.active.load(Ordering::Relaxed) as u64) * (b.weight as u64)
                < (b.active.load(Ordering::Relaxed) as u64) * (a.weight as u64)
            {
                best = i;
            }
        }
        best
    }

    /// Weighted rendezvous hashing: each member scores the value; the
    /// highest wins. A member leaving moves only its own values.
    fn rendezvous(&self, eligible: &[usize], value: &str) -> usize {
        let mut best = eligible[0];
        let mut best_score = f64::NEG_INFINITY;
        for &i in eligible {
            let m = &self.members[i];
            let h = mix(fnv1a(value.as_bytes(), fnv1a(m.name.as_bytes(), 0xcbf2_9ce4_8422_2325)));
            // Uniform in (0, 1), from the hash's top 53 bits.
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = -(m.weight as f64) / u.ln();
            if score > best_score {
                best_score = score;
                best = i;
            }
        }
        best
    }

    /// A member set the persistence cookie (`learn` mode): its value is
    /// remembered with the member (a keyed hash of it, so a member's long
    /// or many values cost little).
    pub fn learn(&self, value: &str, member: usize) {
        if value.len() > LEARNED_VALUE_MAX {
            return;
        }
        let now = self.now_ms();
        let key = self.keys.hash_one(value);
        let mut l = lock(&self.learned);
        if l.len() >= LEARNED_MAX && !l.contains_key(&key) {
            let mut ages: Vec<u64> = l.values().map(|(_, t)| *t).collect();
            let mid = ages.len() / 2;
            let cut = *ages.select_nth_unstable(mid).1;
            l.retain(|_, (_, t)| *t > cut);
        }
        l.insert(key, (member, now));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A name's well-spread hash (to spread members' timers).
pub(crate) fn spread(name: &str) -> u64 {
    mix(fnv1a(name.as_bytes(), 0xcbf2_9ce4_8422_2325))
}

/// splitmix64's finaliser: every input bit moves every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a, 64 bits, from `seed`.
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(s: Scheduler, weights: &[u32], cookie: Option<CookieMode>) -> Pool {
        Pool::new(&config::Pool {
            name: "p".into(),
            scheduler: s,
            cookie: cookie.map(|mode| config::Cookie {
                name: "SRV".into(),
                mode,
            }),
            health: None,
            proxy_protocol: None,
            members: weights
                .iter()
                .enumerate()
                .map(|(i, w)| config::Member {
                    name: format!("m{i}"),
                    address: format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
                    weight: *w,
                })
                .collect(),
        })
    }

    const NONE: Key = Key {
        cookie: None,
        hash: None,
    };

    fn counts(p: &Pool, n: usize) -> Vec<usize> {
        let mut c = vec![0; p.members.len()];
        for _ in 0..n {
            c[p.pick(&NONE, None).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn schedulers_share_as_their_weights_say() {
        assert_eq!(
            counts(&pool(Scheduler::RoundRobin, &[1, 5, 1], None), 300),
            [100, 100, 100]
        );
        let p = pool(Scheduler::WeightedRoundRobin, &[1, 3, 1], None);
        assert_eq!(counts(&p, 500), [100, 300, 100]);
        // Smooth: the heavy member's turns are spread, not in a run.
        let seq: Vec<usize> = (0..5).map(|_| p.pick(&NONE, None).unwrap()).collect();
        assert_eq!(seq, [1, 0, 1, 2, 1]);
        let p = pool(Scheduler::LeastConnections, &[1, 1], None);
        p.members[0].active.store(3, Ordering::Relaxed);
        assert_eq!(counts(&p, 10), [0, 10]);
    }

    #[test]
    fn a_hashed_value_stays_and_a_member_leaving_moves_only_its_own() {
        let p = pool(Scheduler::HashHeader("x-user".into()), &[1, 1, 1, 1], None);
        let pick = |v: &str, skip| {
            p.pick(
                &Key {
                    cookie: None,
                    hash: Some(v),
                },
                skip,
            )
            .unwrap()
        };
        let users: Vec<String> = (0..400).map(|i| format!("user-{i}")).collect();
        let before: Vec<usize> = users.iter().map(|u| pick(u, None)).collect();
        assert_eq!(before, users.iter().map(|u| pick(u, None)).collect::<Vec<_>>());
        let mut spread = [0; 4];
        for b in &before {
            spread[*b] += 1;
        }
        assert!(spread.iter().all(|n| (60..=140).contains(n)), "{spread:?}");
        // Member 2 set aside: only its users move.
        p.set_aside(2);
        for (u, b) in users.iter().zip(&before) {
            let now = pick(u, None);
            if *b == 2 {
                assert_ne!(now, 2);
            } else {
                assert_eq!(now, *b, "{u} moved though its member stayed");
            }
        }
    }

    #[test]
    fn a_cookie_keeps_its_member_while_it_is_up() {
        let p = pool(Scheduler::RoundRobin, &[1, 1, 1], Some(CookieMode::Insert));
        let k = Key {
            cookie: Some("m2"),
            hash: None,
        };
        assert!((0..10).all(|_| p.pick(&k, None) == Some(2)));
        p.set_aside(2);
        assert!((0..10).all(|_| p.pick(&k, None) != Some(2)));
        // A cookie naming no member is scheduled as none.
        let k = Key {
            cookie: Some("m9"),
            hash: None,
        };
        p.pick(&k, None);
        let p = pool(Scheduler::RoundRobin, &[1, 1], Some(CookieMode::Learn));
        p.learn("sess-1", 1);
        let k = Key {
            cookie: Some("sess-1"),
            hash: None,
        };
        assert!((0..10).all(|_| p.pick(&k, None) == Some(1)));
    }

    /// A member its checks call down gets nothing, even by its cookie or
    /// when every other is set aside; none healthy: no member at all.
    #[test]
    fn an_unhealthy_member_is_never_picked() {
        let p = pool(Scheduler::RoundRobin, &[1, 1, 1], Some(CookieMode::Insert));
        p.members[1].healthy.store(false, Ordering::Relaxed);
        let k = Key {
            cookie: Some("m1"),
            hash: None,
        };
        assert!((0..10).all(|_| p.pick(&k, None) != Some(1)));
        p.set_aside(0);
        p.set_aside(2);
        assert!((0..10).all(|_| matches!(p.pick(&NONE, None), Some(0 | 2))));
        p.members[0].healthy.store(false, Ordering::Relaxed);
        p.members[2].active.store(MEMBER_IN_FLIGHT_MAX, Ordering::Relaxed);
        assert_eq!(p.pick(&NONE, None), None, "one unhealthy, one at its cap");
        p.members[2].active.store(MEMBER_IN_FLIGHT_MAX - 1, Ordering::Relaxed);
        assert_eq!(p.pick(&NONE, None), Some(2));
    }
}
