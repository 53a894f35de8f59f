//! The pickle PyTorch's memory tools read: a snapshot written as the
//! dictionary `torch.cuda.memory._snapshot()` returns (the schema in
//! `torch/cuda/memory.py`), in pickle protocol 2 (dicts, lists, tuples,
//! strings, integers, booleans: the opcodes Python's `pickle` has read since
//! 2.3).

use std::collections::HashMap;
use std::io::{self, Write};

use crate::frames::Frame;
use crate::history::Action;
use crate::snapshot::{BlockState, Snapshot};

const PROTO: u8 = 0x80;
const STOP: u8 = b'.';
const EMPTY_DICT: u8 = b'}';
const EMPTY_LIST: u8 = b']';
const MARK: u8 = b'(';
const SETITEMS: u8 = b'u';
const APPENDS: u8 = b'e';
const BININT: u8 = b'J';
const LONG1: u8 = 0x8a;
const BINUNICODE: u8 = b'X';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const TUPLE2: u8 = 0x86;

/// A pickle being written.
struct Pickler<'a, W: Write> {
    out: &'a mut W,
}

impl<W: Write> Pickler<'_, W> {
    fn byte(&mut self, byte: u8) -> io::Result<()> {
        self.out.write_all(&[byte])
    }

    fn int(&mut self, value: i128) -> io::Result<()> {
        if let Ok(small) = i32::try_from(value) {
            self.byte(BININT)?;
            return self.out.write_all(&small.to_le_bytes());
        }
        // Two's complement, little-endian, as short as it goes.
        let bytes = value.to_le_bytes();
        let mut len = bytes.len();
        while len > 1 {
            let (last, before) = (bytes[len - 1], bytes[len - 2]);
            let redundant =
                (last == 0 && before & 0x80 == 0) || (last == 0xff && before & 0x80 != 0);
            if !redundant {
                break;
            }
            len -= 1;
        }
        self.byte(LONG1)?;
        self.byte(len as u8)?;
        self.out.write_all(&bytes[..len])
    }

    fn str(&mut self, value: &str) -> io::Result<()> {
        self.byte(BINUNICODE)?;
        self.out.write_all(&(value.len() as u32).to_le_bytes())?;
        self.out.write_all(value.as_bytes())
    }

    fn bool(&mut self, value: bool) -> io::Result<()> {
        self.byte(if value { NEWTRUE } else { NEWFALSE })
    }

    /// A dict: `items` writes key, value, key, value...
    fn dict(&mut self, items: impl FnOnce(&mut Self) -> io::Result<()>) -> io::Result<()> {
        self.byte(EMPTY_DICT)?;
        self.byte(MARK)?;
        items(self)?;
        self.byte(SETITEMS)
    }

    /// A list: `items` writes its elements.
    fn list(&mut self, items: impl FnOnce(&mut Self) -> io::Result<()>) -> io::Result<()> {
        self.byte(EMPTY_LIST)?;
        self.byte(MARK)?;
        items(self)?;
        self.byte(APPENDS)
    }

    fn key_int(&mut self, key: &str, value: usize) -> io::Result<()> {
        self.str(key)?;
        self.int(value as i128)
    }

    fn key_str(&mut self, key: &str, value: &str) -> io::Result<()> {
        self.str(key)?;
        self.str(value)
    }

    fn frames(&mut self, frames: &[Frame]) -> io::Result<()> {
        self.str("frames")?;
        self.list(|p| {
            for frame in frames {
                p.dict(|p| {
                    p.key_str("name", &frame.name)?;
                    p.key_str("filename", &frame.filename)?;
                    p.key_int("line", frame.line as usize)
                })?;
            }
            Ok(())
        })
    }

    fn pool_id(&mut self) -> io::Result<()> {
        self.str("segment_pool_id")?;
        self.int(0)?;
        self.int(0)?;
        self.byte(TUPLE2)
    }
}

fn state(state: BlockState) -> &'static str {
    match state {
        BlockState::InUse => "active_allocated",
        _ => "inactive",
    }
}

/// Writes `snapshot` as `torch.cuda.memory._snapshot()`'s dictionary.
pub(crate) fn write_snapshot(snapshot: &Snapshot, out: &mut impl Write) -> io::Result<()> {
    let no_frames: Vec<Frame> = Vec::new();
    let frames_of = |index: usize| snapshot.frames.get(index).unwrap_or(&no_frames);
    // Where each block in use was allocated: its allocation's stack.
    let mut allocated_at: HashMap<usize, usize> = HashMap::new();
    for (index, event) in snapshot.history.iter().enumerate() {
        match event.action {
            Action::Alloc => {
                allocated_at.insert(event.address, index);
            }
            Action::Free => {
                allocated_at.remove(&event.address);
            }
            _ => {}
        }
    }
    let mut p = Pickler { out };
    p.byte(PROTO)?;
    p.byte(2)?;
    p.dict(|p| {
        p.str("segments")?;
        p.list(|p| {
            for segment in &snapshot.segments {
                let allocated: usize = segment
                    .blocks
                    .iter()
                    .filter(|block| block.state == BlockState::InUse)
                    .map(|block| block.size)
                    .sum();
                let requested: usize = segment
                    .blocks
                    .iter()
                    .filter(|block| block.state == BlockState::InUse)
                    .map(|block| block.requested.unwrap_or(block.size))
                    .sum();
                p.dict(|p| {
                    p.key_int("device", 0)?;
                    p.key_int("address", segment.address)?;
                    p.key_int("total_size", segment.size)?;
                    p.key_int("allocated_size", allocated)?;
                    p.key_int("active_size", allocated)?;
                    p.key_int("requested_size", requested)?;
                    p.key_int("stream", 0)?;
                    p.key_str(
                        "segment_type",
                        if segment.size > 1 << 20 {
                            "large"
                        } else {
                            "small"
                        },
                    )?;
                    p.pool_id()?;
                    p.str("is_expandable")?;
                    p.bool(segment.kind == crate::snapshot::SegmentKind::Reserved)?;
                    p.frames(&no_frames)?;
                    p.str("blocks")?;
                    p.list(|p| {
                        for block in &segment.blocks {
                            p.dict(|p| {
                                p.key_int("address", block.address)?;
                                p.key_int("size", block.size)?;
                                p.key_int("requested_size", block.requested.unwrap_or(block.size))?;
                                p.key_str("state", state(block.state))?;
                                let at = match block.state {
                                    BlockState::InUse => allocated_at.get(&block.address),
                                    _ => None,
                                };
                                p.frames(at.map_or(&no_frames, |&index| frames_of(index)))
                            })?;
                        }
                        Ok(())
                    })
                })?;
            }
            Ok(())
        })?;
        p.str("device_traces")?;
        p.list(|p| {
            p.list(|p| {
                for (index, event) in snapshot.history.iter().enumerate() {
                    let action = match event.action {
                        Action::Alloc => "alloc",
                        Action::Free => "free_requested",
                        Action::SegmentAlloc => "segment_alloc",
                        Action::SegmentFree => "segment_free",
                        Action::SegmentMap => "segment_map",
                        Action::SegmentUnmap => "segment_unmap",
                        Action::LimitFailure => "oom",
                        // Nothing PyTorch's segments show: pages dropped in
                        // place, blocks moved between the cache's own lists.
                        Action::Decommit | Action::Decay | Action::FrontDrain => continue,
                    };
                    p.dict(|p| {
                        p.key_str("action", action)?;
                        p.key_int("addr", event.address)?;
                        p.key_int("size", event.size)?;
                        p.key_int("stream", 0)?;
                        p.key_int("time_us", event.time_us as usize)?;
                        if event.action == Action::LimitFailure {
                            p.key_int("device_free", 0)?;
                        }
                        p.frames(frames_of(index))
                    })?;
                    if event.action == Action::Free {
                        // The memory is reusable at once (no stream to wait
                        // for): PyTorch's tools pair a free request with its
                        // completion.
                        p.dict(|p| {
                            p.key_str("action", "free_completed")?;
                            p.key_int("addr", event.address)?;
                            p.key_int("size", event.size)?;
                            p.key_int("stream", 0)?;
                            p.key_int("time_us", event.time_us as usize)?;
                            p.frames(frames_of(index))
                        })?;
                    }
                }
                Ok(())
            })
        })?;
        p.str("allocator_settings")?;
        p.dict(|p| p.key_str("allocator", "caching-allocator"))
    })?;
    p.byte(STOP)
}
