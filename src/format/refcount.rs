//! Refcount block codec: entries of 1 to 64 bits. Widths of 8 bits and more are
//! big-endian integers; 1, 2 and 4 bits are packed least-significant-bit first.

use crate::corrupt;
use crate::error::Result;

/// Reads entry `index` of a refcount block with entries of `1 << order` bits.
pub fn get(block: &[u8], index: usize, order: u32) -> u64 {
    let bits = 1usize << order;
    match bits {
        1 | 2 | 4 => {
            let bit = index * bits;
            let byte = block[bit / 8];
            ((byte >> (bit % 8)) & ((1u8 << bits) - 1)) as u64
        }
        _ => {
            let width = bits / 8;
            let start = index * width;
            block[start..start + width]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | b as u64)
        }
    }
}

/// The largest refcount an entry of `1 << order` bits can hold.
pub fn max_value(order: u32) -> u64 {
    let bits = 1u32 << order;
    if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Writes entry `index`; fails if `value` does not fit the width.
pub fn set(block: &mut [u8], index: usize, order: u32, value: u64) -> Result<()> {
    if value > max_value(order) {
        return Err(corrupt!(
            "refcount {value} does not fit in {} bits",
            1u32 << order
        ));
    }
    let bits = 1usize << order;
    match bits {
        1 | 2 | 4 => {
            let bit = index * bits;
            let mask = ((1u8 << bits) - 1) << (bit % 8);
            let byte = &mut block[bit / 8];
            *byte = (*byte & !mask) | (((value as u8) << (bit % 8)) & mask);
        }
        _ => {
            let width = bits / 8;
            let start = index * width;
            let be = value.to_be_bytes();
            block[start..start + width].copy_from_slice(&be[8 - width..]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_roundtrips_without_touching_neighbours() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let entries = (512 * 8) >> order;
            let max = max_value(order);
            for i in 0..entries {
                set(&mut block, i, order, (i as u64 * 7 + 3) & max).unwrap();
            }
            for i in 0..entries {
                assert_eq!(
                    get(&block, i, order),
                    (i as u64 * 7 + 3) & max,
                    "order {order}"
                );
            }
            assert!(order == 6 || set(&mut block, 0, order, max + 1).is_err());
        }
    }

    #[test]
    fn sub_byte_packing_is_lsb_first() {
        let mut block = vec![0u8; 1];
        set(&mut block, 0, 0, 1).unwrap();
        assert_eq!(block[0], 0b0000_0001);
        set(&mut block, 3, 0, 1).unwrap();
        assert_eq!(block[0], 0b0000_1001);
        let mut block = vec![0u8; 1];
        set(&mut block, 1, 2, 0xA).unwrap();
        assert_eq!(block[0], 0xA0);
    }
}
