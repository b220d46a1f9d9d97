//! Per-key sequence numbers: which events apply, which are duplicates, which come late, and which
//! jump too far ahead. Pure; the policy is in `docs/pipeline.md` ("Sequences").
//!
//! A key stores its last applied sequence and a 64-bit window of the ones before it (bit `i` set:
//! sequence `applied - 1 - i` was applied). An event at or below the applied sequence is a
//! **duplicate** when the window says it was applied, **out of order** when the window says it
//! never was (a late event: it is not applied now either, the state has moved past it), and a
//! duplicate when it is further back than the window reaches (cannot tell; the safe answer). An
//! event more than `max_gap` above the applied sequence is a **gap** and is not applied: one
//! bogus sequence (say 2^63) would otherwise make every later real event of the key a duplicate.

use partita_proto::v1::DeadLetterReason;

/// What to do with an event of sequence `seq` for a key whose last applied sequence is `applied`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Apply,
    Reject(DeadLetterReason, String),
}

/// Bits in the window.
pub const WINDOW: u64 = 64;

pub fn judge(applied: u64, window: u64, seq: u64, max_gap: u64) -> Verdict {
    if seq > applied {
        let gap = seq - applied;
        return if gap > max_gap {
            Verdict::Reject(
                DeadLetterReason::SequenceGap,
                format!(
                    "sequence {seq} is {gap} above the key's applied {applied} (at most {max_gap} allowed)"
                ),
            )
        } else {
            Verdict::Apply
        };
    }
    let back = applied - seq;
    if back == 0 || back > WINDOW || window & (1 << (back - 1)) != 0 {
        let how =
            if back > WINDOW { " (further back than the window: applied or late, cannot tell)" } else { "" };
        return Verdict::Reject(
            DeadLetterReason::Duplicate,
            format!("sequence {seq} already applied (key at {applied}){how}"),
        );
    }
    Verdict::Reject(
        DeadLetterReason::OutOfOrder,
        format!(
            "sequence {seq} arrived after {applied} and was never applied: the key's state has moved past it"
        ),
    )
}

/// The window after applying `seq` (above `applied`).
pub fn advance(applied: u64, window: u64, seq: u64) -> u64 {
    let d = seq - applied;
    // `applied` itself becomes bit d - 1; older bits move up by d.
    let moved = if d >= WINDOW { 0 } else { window << d };
    let current = if applied > 0 && d <= WINDOW { 1 << (d - 1) } else { 0 };
    moved | current
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(v: Verdict) -> Option<DeadLetterReason> {
        match v {
            Verdict::Apply => None,
            Verdict::Reject(r, _) => Some(r),
        }
    }

    #[test]
    fn in_order_gaps_late_and_repeated_events() {
        use DeadLetterReason::{Duplicate, OutOfOrder, SequenceGap};
        let (mut applied, mut window) = (0u64, 0u64);
        let apply = |seq: u64, applied: &mut u64, window: &mut u64| {
            assert_eq!(judge(*applied, *window, seq, 1000), Verdict::Apply, "seq {seq}");
            *window = advance(*applied, *window, seq);
            *applied = seq;
        };
        for seq in [1, 2, 3, 5, 6] {
            apply(seq, &mut applied, &mut window);
        }
        // 4 never came; 1, 2, 3, 5, 6 did.
        assert_eq!(reason(judge(applied, window, 4, 1000)), Some(OutOfOrder));
        for seq in [1, 2, 3, 5, 6] {
            assert_eq!(reason(judge(applied, window, seq, 1000)), Some(Duplicate), "seq {seq}");
        }
        assert_eq!(reason(judge(applied, window, 1 << 63, 1000)), Some(SequenceGap));
        assert_eq!(reason(judge(applied, window, 6 + 1000, 1000)), None, "exactly the gap allowed");
        // A jump past the window forgets what it covered: far back is a duplicate (cannot tell).
        apply(500, &mut applied, &mut window);
        assert_eq!(reason(judge(applied, window, 499, 1000)), Some(OutOfOrder));
        assert_eq!(reason(judge(applied, window, 6, 1000)), Some(Duplicate), "494 back: beyond the window");
        apply(501, &mut applied, &mut window);
        assert_eq!(reason(judge(applied, window, 500, 1000)), Some(Duplicate));
        assert_eq!(reason(judge(applied, window, 499, 1000)), Some(OutOfOrder));
        // A new key (applied 0): its first event may not jump past the gap either.
        assert_eq!(reason(judge(0, 0, 1001, 1000)), Some(SequenceGap));
        assert_eq!(reason(judge(0, 0, 1000, 1000)), None);
    }

    #[test]
    fn the_window_tracks_the_last_64() {
        let (mut applied, mut window) = (0u64, 0u64);
        for seq in (1..=200).filter(|s| s % 3 != 0) {
            window = advance(applied, window, seq);
            applied = seq;
        }
        for seq in 1..=200u64 {
            let r = reason(judge(applied, window, seq, 10));
            let expected = if seq % 3 == 0 && applied - seq <= WINDOW {
                Some(DeadLetterReason::OutOfOrder)
            } else {
                Some(DeadLetterReason::Duplicate)
            };
            assert_eq!(r, expected, "seq {seq}");
        }
    }
}
