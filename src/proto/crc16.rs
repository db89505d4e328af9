//! CRC-16/MODBUS (reflected poly 0xA001, init 0xFFFF, no final xor), PROTOCOL.md §1.
//! The reference docs call it "CRC-16/IBM"; CRC-16/ARC (init 0) would reject every real frame.

/// Initial register value of CRC-16/MODBUS.
pub const CRC16_INIT: u16 = 0xFFFF;

const fn make_table() -> [u16; 256] {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u16;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xA001 } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// Slicing-by-8 tables: `T[k][b]` is the CRC of byte `b` followed by `k` zero bytes, so eight
/// input bytes fold in with eight independent lookups instead of a serial chain.
const fn make_tables() -> [[u16; 256]; 8] {
    let mut t = [[0u16; 256]; 8];
    t[0] = make_table();
    let mut k = 1;
    while k < 8 {
        let mut b = 0;
        while b < 256 {
            let prev = t[k - 1][b];
            t[k][b] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            b += 1;
        }
        k += 1;
    }
    t
}

static TABLES: [[u16; 256]; 8] = make_tables();

/// Continue a CRC over `data` from register value `crc` (start with [`CRC16_INIT`]).
#[inline]
pub fn crc16_update(mut crc: u16, data: &[u8]) -> u16 {
    let t = &TABLES;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let x = crc ^ u16::from_le_bytes([c[0], c[1]]);
        crc = t[7][(x & 0xFF) as usize]
            ^ t[6][(x >> 8) as usize]
            ^ t[5][c[2] as usize]
            ^ t[4][c[3] as usize]
            ^ t[3][c[4] as usize]
            ^ t[2][c[5] as usize]
            ^ t[1][c[6] as usize]
            ^ t[0][c[7] as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ t[0][((crc ^ b as u16) & 0xFF) as usize];
    }
    crc
}

/// CRC-16/MODBUS of `data`.
#[inline]
pub fn crc16(data: &[u8]) -> u16 {
    crc16_update(CRC16_INIT, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitwise(data: &[u8]) -> u16 {
        let mut crc = 0xFFFFu16;
        for &b in data {
            crc ^= b as u16;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xA001 } else { crc >> 1 };
            }
        }
        crc
    }

    #[test]
    fn check_values_from_protocol_md() {
        assert_eq!(crc16(b""), 0xFFFF);
        assert_eq!(crc16(b"123456789"), 0x4B37);
        assert_eq!(crc16(b"hello"), 0x34F6);
        assert_eq!(crc16(&[0u8; 10]), 0x0770);
    }

    #[test]
    fn table_matches_bitwise_definition_and_streams() {
        let data: Vec<u8> = (0..600u32).map(|i| (i * 31 + 7) as u8).collect();
        for n in [0, 1, 2, 7, 8, 9, 15, 16, 17, 63, 492, 600] {
            assert_eq!(crc16(&data[..n]), bitwise(&data[..n]));
        }
        let split = crc16_update(crc16(&data[..101]), &data[101..]);
        assert_eq!(split, crc16(&data));
    }
}
