//! The audit chain: the canonical form a record is hashed in, and the check
//! `sdnctl audit verify` runs. The controller computes each hash with
//! [`record_hash`] when it applies the change; anyone holding the records
//! recomputes it.
//!
//! A record's hash is SHA-256 over a domain tag, the hash of the record
//! before it, and every field of the record but the hashes, each integer
//! in 8 big-endian bytes and each string behind its length in 4, lists
//! behind their count. The first record of the chain follows [`genesis`];
//! after the oldest records are trimmed, the first one kept follows the
//! anchor, the hash of the last one trimmed.

use crate::v1 as pb;

/// The length of a hash.
pub const HASH_LEN: usize = 32;

const RECORD_TAG: &[u8] = b"sdn.v1 audit record 1\0";
const GENESIS_TAG: &[u8] = b"sdn.v1 audit genesis 1\0";

/// SHA-256.
pub fn sha256(bytes: &[u8]) -> [u8; HASH_LEN] {
    boring::sha::sha256(bytes)
}

/// What the first record of a chain that starts after revision `start`
/// chains to.
pub fn genesis(start: u64) -> [u8; HASH_LEN] {
    let mut b = GENESIS_TAG.to_vec();
    b.extend_from_slice(&start.to_be_bytes());
    sha256(&b)
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn put_count(b: &mut Vec<u8>, n: usize) {
    b.extend_from_slice(&(n as u32).to_be_bytes());
}

/// The hash of record `r` following `prev`. `r.time`, `r.prev_hash` and
/// `r.hash` are not part of it (the time is `time_unix_ms` written out).
pub fn record_hash(prev: &[u8], r: &pb::AuditRecord) -> [u8; HASH_LEN] {
    let mut b = Vec::with_capacity(256);
    b.extend_from_slice(RECORD_TAG);
    b.extend_from_slice(&(prev.len() as u32).to_be_bytes());
    b.extend_from_slice(prev);
    b.extend_from_slice(&r.revision.to_be_bytes());
    b.extend_from_slice(&r.time_unix_ms.to_be_bytes());
    put_str(&mut b, &r.actor);
    put_str(&mut b, &r.refused);
    put_count(&mut b, r.changes.len());
    for line in &r.changes {
        put_str(&mut b, line);
    }
    put_count(&mut b, r.content.len());
    for c in &r.content {
        for s in [&c.op, &c.kind, &c.id] {
            put_str(&mut b, s);
        }
        put_count(&mut b, c.tenants.len());
        for t in &c.tenants {
            put_str(&mut b, t);
        }
        put_str(&mut b, &c.detail);
    }
    put_count(&mut b, r.tenants.len());
    for t in &r.tenants {
        put_str(&mut b, t);
    }
    sha256(&b)
}

/// Unix milliseconds in RFC 3339, UTC, to the millisecond.
pub fn rfc3339(unix_ms: u64) -> String {
    match chrono::DateTime::from_timestamp_millis(unix_ms.min(i64::MAX as u64) as i64) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => format!("unix-ms {unix_ms}"),
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Hex to bytes; `None` for what is not hex (odd length, other characters).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let digit = |b: u8| (b as char).to_digit(16);
    s.as_bytes()
        .chunks(2)
        .map(|p| match p {
            [h, l] => Some((digit(*h)? * 16 + digit(*l)?) as u8),
            _ => None,
        })
        .collect()
}

/// The first record the check found broken, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub revision: u64,
    pub why: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the record of revision {} is broken: {}", self.revision, self.why)
    }
}

impl std::error::Error for Broken {}

/// What a successful check went through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// Records checked against their hash.
    pub chained: u64,
    /// Records older than the chain, which carry no hash.
    pub unchained: u64,
    /// The first and last chained revisions (0 if none).
    pub first: u64,
    pub last: u64,
    /// The hash the next record will chain to: the last record's, or the
    /// anchor when none is kept.
    pub head: Vec<u8>,
    /// The chain's start, its anchor, and every hash checked by revision
    /// (the anchor's included): to compare with another copy, or with a
    /// checkpoint taken earlier.
    pub chain_start: u64,
    pub anchor_revision: u64,
    pub hashes: std::collections::BTreeMap<u64, Vec<u8>>,
}

impl Verified {
    /// Checks that the record of `revision` had hash `hash`, as a
    /// checkpoint taken earlier says.
    pub fn check_checkpoint(&self, revision: u64, hash: &[u8]) -> Result<(), String> {
        match self.hashes.get(&revision) {
            Some(h) if h == hash => Ok(()),
            Some(h) => Err(format!(
                "the record of revision {revision} has hash {}, not the checkpoint's {}: the log was rewritten since",
                hex(h),
                hex(hash)
            )),
            None if revision <= self.chain_start => Err(format!(
                "revision {revision} is given as older than the chain (which this log says starts after {}): the log was rewritten since",
                self.chain_start
            )),
            None if revision < self.anchor_revision => Err(format!(
                "revision {revision} was trimmed (the log keeps records after {}): it cannot be checked any more",
                self.anchor_revision
            )),
            None => Err(format!("the log holds no record of revision {revision}")),
        }
    }

    /// Compares this copy of the log with another's where both hold
    /// records: the same start, and the same hash at the newest revision
    /// both checked.
    pub fn agrees_with(&self, other: &Verified) -> Result<(), String> {
        if self.chain_start != other.chain_start {
            return Err(format!(
                "the chain starts after revision {} in one copy and {} in the other",
                self.chain_start, other.chain_start
            ));
        }
        let common = self.hashes.keys().rev().find(|r| other.hashes.contains_key(r));
        let Some(r) = common else {
            return Err("the two copies have no revision in common".into());
        };
        if self.hashes[r] != other.hashes[r] {
            return Err(format!(
                "revision {r} has hash {} in one copy and {} in the other",
                hex(&self.hashes[r]),
                hex(&other.hashes[r])
            ));
        }
        Ok(())
    }
}

/// Checks records page by page, in revision order.
pub struct Verifier {
    chain_start: u64,
    anchor_revision: u64,
    /// The revision and hash the next chained record must follow.
    expect: Option<(u64, Vec<u8>)>,
    last_seen: u64,
    done: Verified,
}

impl Verifier {
    /// A check of the log an `Audit` answer (its first page) describes.
    pub fn new(first_page: &pb::AuditResponse) -> Result<Verifier, String> {
        if first_page.partial {
            return Err("this view of the log leaves records out (a tenant's view): \
                        only an admin, a supervisor or the platform can check the chain"
                .into());
        }
        if !first_page.chained {
            return Err("the audit chain has not started: every member must run a release that keeps it".into());
        }
        if first_page.anchor_revision < first_page.chain_start {
            return Err(format!(
                "anchor_revision: {} is before the chain's start {}",
                first_page.anchor_revision, first_page.chain_start
            ));
        }
        if first_page.anchor_hash.len() != HASH_LEN {
            return Err(format!(
                "anchor_hash: {} bytes, not {HASH_LEN}",
                first_page.anchor_hash.len()
            ));
        }
        if first_page.anchor_revision == first_page.chain_start
            && first_page.anchor_hash != genesis(first_page.chain_start)
        {
            return Err(format!(
                "anchor_hash: not the genesis of a chain starting after revision {}",
                first_page.chain_start
            ));
        }
        Ok(Verifier {
            chain_start: first_page.chain_start,
            anchor_revision: first_page.anchor_revision,
            expect: Some((first_page.anchor_revision, first_page.anchor_hash.clone())),
            last_seen: 0,
            done: Verified {
                head: first_page.anchor_hash.clone(),
                chain_start: first_page.chain_start,
                anchor_revision: first_page.anchor_revision,
                hashes: [(first_page.anchor_revision, first_page.anchor_hash.clone())].into(),
                ..Verified::default()
            },
        })
    }

    /// Checks the next record.
    pub fn push(&mut self, r: &pb::AuditRecord) -> Result<(), Broken> {
        let broken = |why: String| Broken {
            revision: r.revision,
            why,
        };
        if r.revision <= self.last_seen {
            return Err(broken(format!(
                "it comes after revision {}: out of order",
                self.last_seen
            )));
        }
        self.last_seen = r.revision;
        if r.revision <= self.chain_start {
            if !r.hash.is_empty() || !r.prev_hash.is_empty() {
                return Err(broken(format!(
                    "it is older than the chain (which starts after revision {}) yet carries a hash",
                    self.chain_start
                )));
            }
            self.done.unchained += 1;
            return Ok(());
        }
        if r.revision <= self.anchor_revision {
            return Err(broken(format!(
                "it is at or before the anchor (revision {}): trimmed records are not kept",
                self.anchor_revision
            )));
        }
        let (after, prev) = self.expect.take().expect("set after every record");
        if r.revision != after + 1 {
            return Err(broken(format!(
                "the record before it should be of revision {}, which is missing",
                r.revision - 1
            )));
        }
        if r.prev_hash != prev {
            let of = if after == self.anchor_revision {
                format!("the anchor (revision {after})")
            } else {
                format!("revision {after}")
            };
            return Err(broken(format!(
                "it does not follow {of}: prev_hash {} where {} was expected (this record or the one before was altered)",
                short(&r.prev_hash),
                short(&prev)
            )));
        }
        let want = record_hash(&prev, r);
        if r.hash != want {
            return Err(broken(format!(
                "its content does not match its hash (hash {}, content hashes to {}): it was altered",
                short(&r.hash),
                short(&want)
            )));
        }
        if self.done.first == 0 {
            self.done.first = r.revision;
        }
        self.done.last = r.revision;
        self.done.chained += 1;
        self.done.head = r.hash.clone();
        self.done.hashes.insert(r.revision, r.hash.clone());
        self.expect = Some((r.revision, r.hash.clone()));
        Ok(())
    }

    /// Ends the check: the last record must be the log's head.
    pub fn finish(self, head_revision: u64) -> Result<Verified, Broken> {
        let last = self.last_seen.max(self.anchor_revision);
        if head_revision > last {
            return Err(Broken {
                revision: last + 1,
                why: format!("the log's head is revision {head_revision}, but the records end at {last}"),
            });
        }
        Ok(self.done)
    }
}

fn short(h: &[u8]) -> String {
    if h.is_empty() {
        return "(none)".into();
    }
    let mut s = hex(h);
    s.truncate(16);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(start: u64, n: u64) -> (pb::AuditResponse, Vec<pb::AuditRecord>) {
        let mut prev = genesis(start).to_vec();
        let mut out = Vec::new();
        for revision in start + 1..=start + n {
            let mut r = pb::AuditRecord {
                revision,
                actor: "sdn://admin/alice".into(),
                time_unix_ms: 1_700_000_000_000 + revision,
                changes: vec![format!("put tenant t{revision}")],
                content: vec![pb::AuditChange {
                    op: "create".into(),
                    kind: "tenant".into(),
                    id: format!("t{revision}"),
                    tenants: vec![format!("t{revision}")],
                    detail: "{}".into(),
                }],
                tenants: vec![format!("t{revision}")],
                ..Default::default()
            };
            r.prev_hash = prev.clone();
            r.hash = record_hash(&prev, &r).to_vec();
            prev = r.hash.clone();
            out.push(r);
        }
        let head = pb::AuditResponse {
            chained: true,
            chain_start: start,
            anchor_revision: start,
            anchor_hash: genesis(start).to_vec(),
            head_revision: start + n,
            ..Default::default()
        };
        (head, out)
    }

    fn check(head: &pb::AuditResponse, records: &[pb::AuditRecord]) -> Result<Verified, Broken> {
        let mut v = Verifier::new(head).unwrap();
        for r in records {
            v.push(r)?;
        }
        v.finish(head.head_revision)
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let (head, records) = chain(3, 5);
        let v = check(&head, &records).unwrap();
        assert_eq!((v.chained, v.first, v.last), (5, 4, 8));
        assert_eq!(v.head, records[4].hash);
    }

    /// Each way of rewriting the log is found, at the record it touched.
    #[test]
    fn every_alteration_names_the_first_broken_record() {
        let (head, records) = chain(0, 6);
        let altered = |f: &dyn Fn(&mut Vec<pb::AuditRecord>)| {
            let mut r = records.clone();
            f(&mut r);
            check(&head, &r).unwrap_err()
        };
        // Content changed, hash left.
        let e = altered(&|r| r[2].content[0].detail = r#"{"after":{}}"#.into());
        assert_eq!(e.revision, 3, "{e}");
        assert!(e.why.contains("does not match its hash"), "{e}");
        // Actor changed and its hash recomputed: the next no longer follows.
        let e = altered(&|r| {
            r[2].actor = "sdn://admin/mallory".into();
            r[2].hash = record_hash(&r[2].prev_hash.clone(), &r[2]).to_vec();
        });
        assert_eq!(e.revision, 4, "{e}");
        assert!(e.why.contains("does not follow revision 3"), "{e}");
        // A record removed.
        let e = altered(&|r| {
            r.remove(3);
        });
        assert_eq!(e.revision, 5, "{e}");
        assert!(e.why.contains("revision 4, which is missing"), "{e}");
        // The last record removed.
        let e = altered(&|r| {
            r.pop();
        });
        assert_eq!(e.revision, 6, "{e}");
        // The time moved.
        let e = altered(&|r| r[0].time_unix_ms += 1);
        assert_eq!(e.revision, 1, "{e}");
        // A refusal erased from its record.
        let mut refused = records.clone();
        refused[4].refused = "Apply: not allowed".into();
        let e = check(&head, &refused).unwrap_err();
        assert_eq!(e.revision, 5, "{e}");
    }

    /// After trimming, the first record kept follows the anchor; a forged
    /// anchor is found there.
    #[test]
    fn a_trimmed_log_verifies_from_its_anchor() {
        let (mut head, records) = chain(0, 6);
        head.anchor_revision = 2;
        head.anchor_hash = records[1].hash.clone();
        let v = check(&head, &records[2..]).unwrap();
        assert_eq!((v.chained, v.first), (4, 3));
        head.anchor_hash = records[0].hash.clone();
        let e = check(&head, &records[2..]).unwrap_err();
        assert_eq!(e.revision, 3);
        assert!(e.why.contains("the anchor (revision 2)"), "{e}");
        // A genesis that is not the start's.
        let (mut head, _) = chain(0, 1);
        head.anchor_hash = genesis(1).to_vec();
        assert!(Verifier::new(&head).is_err());
    }

    /// A log rewritten whole, hashes recomputed, still verifies on its
    /// own: a checkpoint taken before, or another replica's copy, finds it.
    #[test]
    fn a_log_rewritten_whole_fails_its_checkpoint_and_the_comparison() {
        let (head, records) = chain(0, 4);
        let honest = check(&head, &records).unwrap();
        honest.check_checkpoint(3, &records[2].hash).unwrap();
        let mut forged = records.clone();
        forged[1].actor = "sdn://admin/mallory".into();
        let mut prev = genesis(0).to_vec();
        for r in &mut forged {
            r.prev_hash = prev.clone();
            r.hash = record_hash(&prev, r).to_vec();
            prev = r.hash.clone();
        }
        let rewritten = check(&head, &forged).unwrap();
        let e = rewritten.check_checkpoint(3, &records[2].hash).unwrap_err();
        assert!(e.contains("rewritten"), "{e}");
        let e = rewritten.agrees_with(&honest).unwrap_err();
        assert!(e.contains("revision 4"), "{e}");
        // A copy that claims the chain starts later.
        let (late, late_records) = chain(2, 2);
        let v = check(&late, &late_records).unwrap();
        assert!(v
            .check_checkpoint(2, &records[1].hash)
            .unwrap_err()
            .contains("rewritten"));
        assert!(v
            .check_checkpoint(1, &records[0].hash)
            .unwrap_err()
            .contains("older than the chain"));
        assert!(v.agrees_with(&honest).is_err());
        // A copy behind another agrees where both hold records.
        let behind = check(
            &pb::AuditResponse {
                head_revision: 3,
                ..head.clone()
            },
            &records[..3],
        )
        .unwrap();
        behind.agrees_with(&honest).unwrap();
    }

    #[test]
    fn hex_round_trips_and_what_is_not_hex_reads_as_none() {
        assert_eq!(unhex(&hex(&[0, 10, 255])), Some(vec![0, 10, 255]));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("\u{e9}a"), None, "not hex, and no panic");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_764_979_200_123), "2025-12-06T00:00:00.123Z");
    }
}
