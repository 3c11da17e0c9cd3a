//! Publishing ids: the event's position as the stream producer's publishing id
//! (`commit LSN << 16 | index`), and back.

use crate::{Lsn, Position};

/// Bits of the publishing id that hold the event's index in its transaction.
pub const INDEX_BITS: u32 = 16;

/// The highest index that gets a publishing id.
pub const MAX_INDEX: u32 = (1 << INDEX_BITS) - 1;

/// The highest commit LSN that gets a publishing id.
pub const MAX_LSN: u64 = (1 << (64 - INDEX_BITS)) - 1;

/// Why a position gets no publishing id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdError {
    /// The event's index in its transaction is above [`MAX_INDEX`].
    IndexTooLarge(u32),
    /// The commit LSN is above [`MAX_LSN`].
    LsnTooLarge(Lsn),
}

/// The publishing id of the event at `position`: `commit LSN << 16 | index`. Injective and
/// order-preserving over positions within the caps.
pub fn publishing_id(position: Position) -> Result<u64, IdError> {
    if position.index > MAX_INDEX {
        return Err(IdError::IndexTooLarge(position.index));
    }
    if position.commit_lsn.0 > MAX_LSN {
        return Err(IdError::LsnTooLarge(position.commit_lsn));
    }
    Ok((position.commit_lsn.0 << INDEX_BITS) | u64::from(position.index))
}

/// The position a publishing id was derived from; `None` for 0, which the broker answers
/// when the producer has stored nothing.
pub fn position_of(id: u64) -> Option<Position> {
    (id != 0).then(|| Position {
        commit_lsn: Lsn(id >> INDEX_BITS),
        index: (id & u64::from(MAX_INDEX)) as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(lsn: u64, index: u32) -> Position {
        Position {
            commit_lsn: Lsn(lsn),
            index,
        }
    }

    #[test]
    fn publishing_ids_preserve_order_and_round_trip() {
        let positions = [
            position(1, 0),
            position(1, 1),
            position(1, MAX_INDEX),
            position(2, 0),
            position(0x16_B374_D848, 7),
            position(MAX_LSN, MAX_INDEX),
        ];
        let ids: Vec<u64> = positions
            .iter()
            .map(|&p| publishing_id(p).unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        for (&p, &id) in positions.iter().zip(&ids) {
            assert_eq!(position_of(id), Some(p));
        }
        assert_eq!(position_of(0), None);
        assert_eq!(
            publishing_id(position(1, MAX_INDEX + 1)),
            Err(IdError::IndexTooLarge(MAX_INDEX + 1))
        );
        assert_eq!(
            publishing_id(position(MAX_LSN + 1, 0)),
            Err(IdError::LsnTooLarge(Lsn(MAX_LSN + 1)))
        );
    }
}
