//! The state-store contract: one suite, the same code for every backend.
//!
//! A backend's test file implements [`Harness`] and expands [`state_contract_suite!`] once. Each
//! check takes partitions from [`Harness::partition`] so runs against a shared cluster do not see
//! each other's data.

use std::future::Future;

use partita_actors::state::{
    Epoch, Offset, PartitionId, PartitionMeta, StateStore, StateValue, StateWrite, StoreError,
};

/// How the suite gets stores of one backend.
pub trait Harness: Send + Sync {
    /// Stores are cheap handles; the suite clones them into concurrent tasks.
    type Store: StateStore + Clone;
    /// A store on the harness's (persistent) location.
    fn open(&self) -> impl Future<Output = Self::Store> + Send;
    /// A partition id no other check of this run uses.
    fn partition(&self, n: u32) -> PartitionId;
}

fn val(tag: &str, len: usize) -> StateValue {
    let data: Vec<u8> = tag.bytes().cycle().take(len.max(tag.len())).collect();
    StateValue { format: 1, data }
}

fn write(p: PartitionId, epoch: u64, offset: i64, entries: &[(&str, StateValue)]) -> StateWrite {
    StateWrite {
        partition: p,
        epoch: Epoch(epoch),
        applied_offset: Offset(offset),
        entries: entries.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.clone())).collect(),
    }
}

fn keys(ks: &[&str]) -> Vec<Vec<u8>> {
    ks.iter().map(|k| k.as_bytes().to_vec()).collect()
}

pub async fn read_your_writes<H: Harness>(h: &H) {
    let s = h.open().await;
    let p = h.partition(0);
    s.claim(p, Epoch(1)).await.unwrap();
    s.write(write(p, 1, 10, &[("a", val("a1", 8)), ("b", val("b1", 300))])).await.unwrap();
    let got = s.read(p, &keys(&["a", "b"])).await.unwrap();
    assert_eq!(got, vec![Some(val("a1", 8)), Some(val("b1", 300))]);
    s.write(write(p, 1, 11, &[("a", val("a2", 8))])).await.unwrap();
    let got = s.read(p, &keys(&["b", "a"])).await.unwrap();
    assert_eq!(got, vec![Some(val("b1", 300)), Some(val("a2", 8))], "overwrite visible, order kept");
    assert_eq!(s.meta(p).await.unwrap(), PartitionMeta { applied_offset: Some(Offset(11)), epoch: Epoch(1) });
}

pub async fn missing_keys_and_untouched_partitions<H: Harness>(h: &H) {
    let s = h.open().await;
    let p = h.partition(1);
    assert_eq!(s.meta(p).await.unwrap(), PartitionMeta::default(), "never written: no offset, epoch 0");
    assert_eq!(s.read(p, &keys(&["x", "y"])).await.unwrap(), vec![None, None]);
    s.claim(p, Epoch(1)).await.unwrap();
    s.write(write(p, 1, 0, &[("x", val("x", 4))])).await.unwrap();
    assert_eq!(s.read(p, &keys(&["nope", "x", ""])).await.unwrap(), vec![None, Some(val("x", 4)), None]);
    assert_eq!(s.read(p, &[]).await.unwrap(), Vec::<Option<StateValue>>::new());
    // The same key in another partition is another key.
    assert_eq!(s.read(h.partition(2), &keys(&["x"])).await.unwrap(), vec![None]);
}

/// A write that fails leaves neither its states nor its offset behind.
pub async fn fencing_and_atomicity<H: Harness>(h: &H) {
    let s = h.open().await;
    let p = h.partition(3);
    s.claim(p, Epoch(2)).await.unwrap();
    s.write(write(p, 2, 5, &[("k", val("old", 16))])).await.unwrap();
    let err =
        s.write(write(p, 1, 99, &[("k", val("zombie", 16)), ("new", val("zombie", 16))])).await.unwrap_err();
    assert_eq!(err, StoreError::Fenced { partition: p, epoch: Epoch(1), current: Epoch(2) });
    assert_eq!(
        s.read(p, &keys(&["k", "new"])).await.unwrap(),
        vec![Some(val("old", 16)), None],
        "no state applied"
    );
    assert_eq!(s.meta(p).await.unwrap().applied_offset, Some(Offset(5)), "no offset applied");

    // A claim by a newer owner fences the old one before the new one writes anything.
    let m = s.claim(p, Epoch(3)).await.unwrap();
    assert_eq!(m, PartitionMeta { applied_offset: Some(Offset(5)), epoch: Epoch(3) }, "resume point");
    let err = s.write(write(p, 2, 6, &[("k", val("stale", 16))])).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { current: Epoch(3), .. }), "{err:?}");
    assert!(matches!(s.claim(p, Epoch(2)).await, Err(StoreError::Fenced { .. })));
    assert!(
        matches!(s.claim(p, Epoch(3)).await, Err(StoreError::Fenced { current: Epoch(3), .. })),
        "an epoch is claimed once: a second claimer of it is fenced"
    );
    s.write(write(p, 3, 7, &[("k", val("new", 16))])).await.unwrap();
    assert_eq!(s.read(p, &keys(&["k"])).await.unwrap(), vec![Some(val("new", 16))]);
    // Writes are fenced on the exact epoch: a newer one that never claimed is not an owner either.
    let err = s.write(write(p, 4, 8, &[("k", val("unclaimed", 16))])).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { epoch: Epoch(4), current: Epoch(3), .. }), "{err:?}");
    assert_eq!(s.meta(p).await.unwrap(), PartitionMeta { applied_offset: Some(Offset(7)), epoch: Epoch(3) });
    assert_eq!(s.read(p, &keys(&["k"])).await.unwrap(), vec![Some(val("new", 16))]);
    // Claiming a partition never seen works too.
    let fresh = h.partition(4);
    assert_eq!(
        s.claim(fresh, Epoch(1)).await.unwrap(),
        PartitionMeta { applied_offset: None, epoch: Epoch(1) }
    );
}

/// Owners that read the same stored epoch and race to claim the next one: exactly one wins, the
/// others are fenced (the compare-and-set a shared store needs when nodes take over partitions).
pub async fn concurrent_claims_of_one_epoch_have_one_winner<H: Harness>(h: &H) {
    let s = h.open().await;
    for (p, stored) in [(h.partition(7), 0), (h.partition(8), 5)] {
        if stored > 0 {
            s.claim(p, Epoch(stored)).await.unwrap();
        }
        let next = Epoch(s.meta(p).await.unwrap().epoch.0 + 1);
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                async move { s.claim(p, next).await }
            })
            .collect();
        let results = futures_join_all(racers).await;
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "partition {p}: {results:?}");
        assert!(
            results.iter().all(|r| r.is_ok() || matches!(r, Err(StoreError::Fenced { .. }))),
            "the losers are fenced: {results:?}"
        );
        assert_eq!(s.meta(p).await.unwrap().epoch, next);
    }
}

pub async fn large_values<H: Harness>(h: &H) {
    let s = h.open().await;
    let p = h.partition(5);
    s.claim(p, Epoch(1)).await.unwrap();
    let big = val("0123456789abcdef", 4 << 20);
    s.write(write(p, 1, 1, &[("big", big.clone()), ("small", val("s", 1))])).await.unwrap();
    let got = s.read(p, &keys(&["big", "small"])).await.unwrap();
    assert_eq!(got[0].as_ref().map(|v| v.data.len()), Some(4 << 20));
    assert_eq!(got[0], Some(big));
    assert_eq!(got[1], Some(val("s", 1)));
}

pub async fn many_partitions_at_once<H: Harness>(h: &H) {
    let s = h.open().await;
    let tasks: Vec<_> = (0..32u32)
        .map(|i| {
            let (s, p) = (s.clone(), h.partition(100 + i));
            async move {
                s.claim(p, Epoch(1)).await.unwrap();
                for off in 0..5 {
                    let tag = format!("p{i}o{off}");
                    s.write(write(p, 1, off, &[("k", val(&tag, 32)), (tag.as_str(), val(&tag, 8))]))
                        .await
                        .unwrap();
                }
                (p, i)
            }
        })
        .collect();
    for (p, i) in futures_join_all(tasks).await {
        assert_eq!(s.read(p, &keys(&["k"])).await.unwrap(), vec![Some(val(&format!("p{i}o4"), 32))]);
        assert_eq!(s.meta(p).await.unwrap().applied_offset, Some(Offset(4)));
    }
}

pub async fn durable_across_reopen<H: Harness>(h: &H) {
    let p = h.partition(6);
    {
        let s = h.open().await;
        s.claim(p, Epoch(7)).await.unwrap();
        s.write(write(p, 7, 42, &[("k", val("durable", 64))])).await.unwrap();
    }
    let s = h.open().await;
    assert_eq!(s.meta(p).await.unwrap(), PartitionMeta { applied_offset: Some(Offset(42)), epoch: Epoch(7) });
    assert_eq!(s.read(p, &keys(&["k"])).await.unwrap(), vec![Some(val("durable", 64))]);
    assert!(
        matches!(s.write(write(p, 6, 43, &[])).await, Err(StoreError::Fenced { .. })),
        "the fence survives too"
    );
}

/// The stored applied offset never moves backwards: a write below it changes nothing and fails
/// (an owner replaying old batches over newer state would be a bug, not a race).
pub async fn the_applied_offset_never_moves_backwards<H: Harness>(h: &H) {
    let s = h.open().await;
    let p = h.partition(9);
    s.claim(p, Epoch(1)).await.unwrap();
    s.write(write(p, 1, 10, &[("k", val("ten", 8))])).await.unwrap();
    let err = s.write(write(p, 1, 9, &[("k", val("nine", 8))])).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert_eq!(s.meta(p).await.unwrap().applied_offset, Some(Offset(10)));
    assert_eq!(s.read(p, &keys(&["k"])).await.unwrap(), vec![Some(val("ten", 8))], "nothing applied");
    // The same offset again is harmless (nothing new), and forward goes on.
    s.write(write(p, 1, 10, &[])).await.unwrap();
    s.write(write(p, 1, 11, &[("k", val("eleven", 8))])).await.unwrap();
    // A new owner resumes from the stored offset; it cannot go below it either.
    s.claim(p, Epoch(2)).await.unwrap();
    assert!(matches!(s.write(write(p, 2, 3, &[])).await, Err(StoreError::Corrupt { .. })));
    assert_eq!(s.meta(p).await.unwrap(), PartitionMeta { applied_offset: Some(Offset(11)), epoch: Epoch(2) });
}

async fn futures_join_all<F: Future + Send + 'static>(fs: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("contract task panicked"));
    }
    out
}

/// Expands to one `#[tokio::test]` per contract check. `$harness` is an async expression giving
/// an `impl Harness`; it fails the test when its backend cannot be started (never a skip).
#[macro_export]
macro_rules! state_contract_suite {
    ($harness:expr) => {
        $crate::state_contract_suite!(@one $harness, read_your_writes);
        $crate::state_contract_suite!(@one $harness, missing_keys_and_untouched_partitions);
        $crate::state_contract_suite!(@one $harness, fencing_and_atomicity);
        $crate::state_contract_suite!(@one $harness, concurrent_claims_of_one_epoch_have_one_winner);
        $crate::state_contract_suite!(@one $harness, large_values);
        $crate::state_contract_suite!(@one $harness, many_partitions_at_once);
        $crate::state_contract_suite!(@one $harness, durable_across_reopen);
        $crate::state_contract_suite!(@one $harness, the_applied_offset_never_moves_backwards);
    };
    (@one $harness:expr, $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let h = $harness.await;
            $crate::state_contract::$name(&h).await;
        }
    };
}
