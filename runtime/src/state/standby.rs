//! Standby replicas (`[state] standby_replicas`): warm copies of partitions that other nodes own,
//! kept by tailing their changelog partitions into this node's RocksDB, so a failover that lands
//! a partition here replays only its last moments instead of the whole partition.
//!
//! Who keeps which copy: every [`REFRESH`] each node describes the consumer group
//! (DescribeGroups): each member's client id, zone (its `client.rack`, sent in the subscription
//! metadata, version 3 of the consumer protocol) and assigned partitions. For each partition the
//! members other than its owner are ranked, other zones first (a zone's loss takes the owner and
//! its zone's copies together), then by a hash of (partition, client id), and the first
//! `standby_replicas` keep a copy. Every node ranks the same description the same way, so no
//! coordination is needed; while descriptions differ (a rebalance) a copy may be kept twice or
//! briefly not at all.
//!
//! The group's assignor (librdkafka's cooperative-sticky) decides where a partition goes on a
//! failover, not partita: a copy helps when the partition lands on it. With `standby_replicas` =
//! nodes - 1 every failover finds one.
//!
//! A copy is applied like a claim's restore ([`super::changelog::Replayer`]): in chunks, each a
//! compare-and-set on the partition's stored epoch and changelog position, so a claim of the
//! partition on this node (which bumps the epoch first) stops the standby's writes at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use partita_actors::state::PartitionId;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::changelog::{ChangelogStore, Polled};

/// How often the group is described.
pub const REFRESH: Duration = Duration::from_secs(2);
/// How often what was read is applied (a copy is at most about this far behind, plus the fetch).
const APPLY_EVERY: Duration = Duration::from_millis(200);

/// One member of the consumer group, as DescribeGroups tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub client_id: String,
    /// Its `client.rack` (zone); `None` when it sent none.
    pub zone: Option<String>,
    /// Its assigned partitions of the input topic.
    pub partitions: Vec<i32>,
}

/// The partitions `me` (a client id) keeps standby copies of: for each partition owned by
/// another member, the `replicas` best-ranked other members keep one.
pub fn standby_for(members: &[Member], me: &str, replicas: usize) -> BTreeSet<i32> {
    let mut mine = BTreeSet::new();
    for owner in members {
        for &p in &owner.partitions {
            let mut candidates: Vec<&Member> =
                members.iter().filter(|m| m.client_id != owner.client_id).collect();
            candidates.sort_by_key(|m| (m.zone.is_some() && m.zone == owner.zone, rank(p, &m.client_id)));
            if candidates.iter().take(replicas).any(|m| m.client_id == me) {
                mine.insert(p);
            }
        }
    }
    mine
}

/// A stable hash of (partition, client id) (FNV-1a): the same on every node and version.
fn rank(p: i32, client_id: &str) -> u64 {
    p.to_be_bytes()
        .iter()
        .chain(client_id.as_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// The members of `group` and their partitions of `topic`; `None` while the group rebalances
/// (its assignments are not known then).
fn describe(client: &BaseConsumer, group: &str, topic: &str) -> anyhow::Result<Option<Vec<Member>>> {
    let list = client.fetch_group_list(Some(group), Duration::from_secs(5))?;
    let Some(info) = list.groups().iter().find(|g| g.name() == group) else { return Ok(Some(Vec::new())) };
    if info.state() != "Stable" {
        return Ok(None);
    }
    Ok(Some(
        info.members()
            .iter()
            .map(|m| Member {
                client_id: m.client_id().to_owned(),
                zone: m.metadata().and_then(subscription_rack),
                partitions: m.assignment().map(|a| assigned(a, topic)).unwrap_or_default(),
            })
            .collect(),
    ))
}

/// Reads the consumer protocol's big-endian fields.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        (self.0.len() >= n).then(|| {
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            head
        })
    }
    fn i16(&mut self) -> Option<i16> {
        self.take(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> Option<i32> {
        self.take(4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A nullable string (i16 length, -1 for null).
    fn string(&mut self) -> Option<Option<&'a str>> {
        match self.i16()? {
            -1 => Some(None),
            n => std::str::from_utf8(self.take(usize::try_from(n).ok()?)?).ok().map(Some),
        }
    }
    /// Nullable bytes (i32 length, -1 for null).
    fn bytes(&mut self) -> Option<&'a [u8]> {
        match self.i32()? {
            -1 => Some(&[]),
            n => self.take(usize::try_from(n).ok()?),
        }
    }
    /// [topic [partition]], calling `f` for each.
    fn topic_partitions(&mut self, mut f: impl FnMut(&str, i32)) -> Option<()> {
        for _ in 0..self.i32()? {
            let topic = self.string()?.unwrap_or_default();
            for _ in 0..self.i32()? {
                f(topic, self.i32()?);
            }
        }
        Some(())
    }
}

/// The rack (`client.rack`) in a ConsumerProtocolSubscription: version, topics, user data, owned
/// partitions (v1+), generation (v2+), rack (v3+).
fn subscription_rack(metadata: &[u8]) -> Option<String> {
    let mut c = Cursor(metadata);
    if c.i16()? < 3 {
        return None;
    }
    for _ in 0..c.i32()? {
        c.string()?;
    }
    c.bytes()?;
    c.topic_partitions(|_, _| {})?;
    c.i32()?;
    c.string()?.filter(|r| !r.is_empty()).map(str::to_owned)
}

/// The partitions of `topic` in a ConsumerProtocolAssignment: version, [topic [partition]], user
/// data.
fn assigned(assignment: &[u8], topic: &str) -> Vec<i32> {
    let mut c = Cursor(assignment);
    let mut out = Vec::new();
    let parsed = c.i16().and_then(|_| {
        c.topic_partitions(|t, p| {
            if t == topic {
                out.push(p)
            }
        })
    });
    if parsed.is_none() {
        out.clear();
    }
    out
}

/// The standby thread: stops when dropped.
pub struct Standby {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The partitions kept now, with the changelog position each copy reached (-1: none yet).
    pub copies: Arc<std::sync::Mutex<BTreeMap<i32, i64>>>,
}

/// What the standby needs to know about this node.
#[derive(Debug, Clone)]
pub struct StandbySettings {
    pub group: String,
    pub input_topic: String,
    /// This node's consumer `client.id`: how it finds itself among the group's members.
    pub client_id: String,
    pub replicas: usize,
}

impl Standby {
    pub fn start(store: ChangelogStore, settings: StandbySettings) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let copies = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let describer: BaseConsumer = store.tier().client_config(&[]).create()?;
        let thread = {
            let (stop, copies) = (stop.clone(), copies.clone());
            std::thread::Builder::new().name("partita-standby".into()).spawn(move || {
                if let Err(e) = run(&store, &settings, &describer, &stop, &copies) {
                    tracing::error!(error = %e, "standby replicas stopped; failovers to this node restore whole partitions");
                }
            })?
        };
        Ok(Self { stop, thread: Some(thread), copies })
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    store: &ChangelogStore,
    settings: &StandbySettings,
    describer: &BaseConsumer,
    stop: &AtomicBool,
    copies: &std::sync::Mutex<BTreeMap<i32, i64>>,
) -> anyhow::Result<()> {
    let mut replayer = store.replayer()?;
    let mut described = Instant::now() - REFRESH;
    let mut warned = HashMap::<String, Instant>::new();
    let mut warn = |what: String| {
        // The same problem at most once a minute.
        if warned.get(&what).is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
            tracing::warn!("standby replicas: {what}");
            warned.insert(what, Instant::now());
        }
    };
    while !stop.load(Ordering::SeqCst) {
        if described.elapsed() >= REFRESH {
            described = Instant::now();
            match describe(describer, &settings.group, &settings.input_topic) {
                // Rebalancing: keep the copies as they are until the group settles.
                Ok(None) => {}
                Ok(Some(members)) => {
                    let me = members.iter().filter(|m| m.client_id == settings.client_id).count();
                    let wanted = if me == 1 {
                        standby_for(&members, &settings.client_id, settings.replicas)
                    } else {
                        if me > 1 {
                            warn(format!(
                                "{me} members share this node's client.id {:?}: give each node its own to keep standby copies",
                                settings.client_id
                            ));
                        }
                        BTreeSet::new()
                    };
                    let now: BTreeSet<i32> = replayer.partitions().map(|p| p.0 as i32).collect();
                    for &p in now.difference(&wanted) {
                        replayer.remove(PartitionId(p as u32));
                    }
                    for &p in wanted.difference(&now) {
                        // Skipped while this node claims or owns it; retried next round.
                        if let Err(e) = store.stand_by(&mut replayer, PartitionId(p as u32)) {
                            warn(format!("partition {p}: {e}"));
                        }
                    }
                    let held: BTreeSet<i32> = replayer.partitions().map(|p| p.0 as i32).collect();
                    if copies.lock().unwrap().keys().ne(held.iter()) {
                        tracing::info!(partitions = ?held, "standby copies");
                    }
                }
                Err(e) => warn(format!("describing group {}: {e}", settings.group)),
            }
        }
        let until = Instant::now() + APPLY_EVERY;
        while Instant::now() < until {
            match replayer.poll(Duration::from_millis(50)) {
                Ok(Polled::Nothing | Polled::Record | Polled::End(_)) => {}
                // A chunk that could not be applied dropped its partition (claimed here since,
                // or the broker failed); it is taken up again next round if still wanted.
                Err(e) => warn(e.to_string()),
            }
        }
        for p in replayer.partitions().collect::<Vec<_>>() {
            if let Err(e) = replayer.flush(p) {
                warn(e.to_string());
            }
        }
        *copies.lock().unwrap() = replayer.positions().map(|(p, at)| (p, at.unwrap_or(-1))).collect();
    }
    copies.lock().unwrap().clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, zone: &str, partitions: &[i32]) -> Member {
        Member { client_id: id.into(), zone: Some(zone.into()), partitions: partitions.to_vec() }
    }

    #[test]
    fn copies_go_to_other_members_other_zones_first_and_each_partition_gets_its_count() {
        let members = [
            member("n0", "a", &[0, 3]),
            member("n1", "b", &[1, 4]),
            member("n2", "c", &[2, 5]),
            member("n3", "a", &[]),
        ];
        let ids = ["n0", "n1", "n2", "n3"];
        for replicas in 0..=3 {
            let kept: Vec<BTreeSet<i32>> = ids.iter().map(|id| standby_for(&members, id, replicas)).collect();
            for owner in &members {
                for p in &owner.partitions {
                    let holders: Vec<&str> =
                        ids.iter().zip(&kept).filter(|(_, k)| k.contains(p)).map(|(id, _)| *id).collect();
                    assert_eq!(holders.len(), replicas, "partition {p} with {replicas}: {holders:?}");
                    assert!(!holders.contains(&owner.client_id.as_str()), "the owner keeps no copy");
                    if replicas <= 2 {
                        // Two members are in other zones than any owner's: they come first.
                        assert!(
                            holders
                                .iter()
                                .all(|h| members.iter().find(|m| m.client_id == *h).unwrap().zone
                                    != owner.zone),
                            "partition {p}: {holders:?} share the owner's zone"
                        );
                    }
                }
            }
        }
        assert!(standby_for(&members, "stranger", 3).is_empty());
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as i16).to_be_bytes());
        out.extend(s.as_bytes());
    }

    #[test]
    fn the_rack_and_the_assignment_are_read_from_the_consumer_protocol() {
        // ConsumerProtocolSubscription v3 as librdkafka writes it.
        let mut sub = Vec::new();
        sub.extend(3i16.to_be_bytes());
        sub.extend(1i32.to_be_bytes());
        string(&mut sub, "transactions");
        sub.extend(2i32.to_be_bytes());
        sub.extend([7, 7]);
        sub.extend(1i32.to_be_bytes());
        string(&mut sub, "transactions");
        sub.extend(1i32.to_be_bytes());
        sub.extend(4i32.to_be_bytes());
        sub.extend(12i32.to_be_bytes());
        string(&mut sub, "b");
        assert_eq!(subscription_rack(&sub).as_deref(), Some("b"));
        assert_eq!(subscription_rack(&sub[..sub.len() - 1]), None, "truncated");
        let mut v2 = sub.clone();
        v2[1] = 2;
        assert_eq!(subscription_rack(&v2), None, "no rack before v3");

        let mut asg = Vec::new();
        asg.extend(0i16.to_be_bytes());
        asg.extend(2i32.to_be_bytes());
        string(&mut asg, "other");
        asg.extend(1i32.to_be_bytes());
        asg.extend(9i32.to_be_bytes());
        string(&mut asg, "transactions");
        asg.extend(2i32.to_be_bytes());
        asg.extend(0i32.to_be_bytes());
        asg.extend(5i32.to_be_bytes());
        asg.extend((-1i32).to_be_bytes());
        assert_eq!(assigned(&asg, "transactions"), vec![0, 5]);
        assert_eq!(assigned(&asg[..asg.len() - 9], "transactions"), Vec::<i32>::new(), "truncated");
    }
}
