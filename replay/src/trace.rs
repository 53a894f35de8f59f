//! The trace format and its parser.
//!
//! A trace is text, one event a line (see `traces/README.md`):
//!
//! ```text
//! # caching-allocator trace v1
//! p 0
//! a 1 602112
//! f 1
//! ```
//!
//! The parser checks every line and resolves block ids to dense slot indices,
//! so that a replay does no hashing: an event is `Alloc { slot, size }` or
//! `Free { slot, size }`, and passes are ranges of event indices. A slot is
//! reused once its block is freed, so the slot table a replay keeps is as
//! long as the most blocks ever live at once.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;

/// The first line of every trace.
pub const HEADER: &str = "# caching-allocator trace v1";

/// The alignment every block is allocated with (c10 allocates every CPU block
/// 64-byte aligned).
pub const ALIGN: usize = 64;

/// One replayed event. Blocks of size 0 are not events: c10 never calls the
/// allocator for them, and neither does the replayer (their `a` and `f` lines
/// are checked, then dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Allocate `size` bytes (aligned to [`ALIGN`]) into `slot`.
    Alloc {
        /// Index into the replayer's slot table.
        slot: u32,
        /// Bytes requested; never 0.
        size: usize,
    },
    /// Free the block in `slot`, which was allocated with `size` bytes.
    Free {
        /// Index into the replayer's slot table.
        slot: u32,
        /// The block's size (so a free needs no lookup for its layout).
        size: usize,
    },
}

/// A parsed trace.
#[derive(Clone, Debug)]
pub struct Trace {
    /// The file name (no directory), for reports.
    pub name: String,
    /// Every event of the file, set-up first, then pass 0, pass 1, ...
    pub events: Vec<Event>,
    /// Events before `p 0` (run once).
    pub setup: Range<usize>,
    /// Event range of each pass of the file, in order.
    pub passes: Vec<Range<usize>>,
    /// Events that bring the state at the end of the file back to the state
    /// after set-up, so the file's passes can be replayed again: frees of
    /// blocks allocated during the passes and still live at the end, then
    /// allocations (into their old slots) of set-up blocks freed during the
    /// passes.
    pub wrap: Vec<Event>,
    /// Blocks live at the end of the file (the replayer frees whatever is
    /// live when it stops).
    pub blocks_live_at_end: usize,
    /// Length of the slot table: the most blocks live at once.
    pub slots: usize,
    /// Highest sum of live block sizes over the file.
    pub peak_live_bytes: usize,
    /// Live bytes after set-up.
    pub live_after_setup: usize,
    /// Live bytes at the end of each pass.
    pub live_at_pass_end: Vec<usize>,
    /// Allocations per pass (size 0 excluded).
    pub allocs_per_pass: Vec<usize>,
    /// `a` lines with size 0 (checked, not replayed).
    pub zero_size_allocs: usize,
}

impl Trace {
    /// Parses a trace file; errors name the file and line.
    pub fn from_path(path: &Path) -> Result<Self, ParseError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ParseError {
            file: display.clone(),
            line: 0,
            message: format!("cannot read: {error}"),
        })?;
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| display.clone());
        Self::parse(&text, &display, name)
    }

    /// Parses trace text. `file` names the source in errors, `name` the
    /// trace in reports.
    pub fn parse(text: &str, file: &str, name: String) -> Result<Self, ParseError> {
        Parser::new(file).run(text, name)
    }

    /// Events of pass `index` of the replay (the file's passes repeat).
    pub fn pass_events(&self, index: usize) -> &[Event] {
        &self.events[self.passes[index % self.passes.len()].clone()]
    }

    /// Live bytes at the end of replayed pass `index`.
    pub fn live_at_end_of_pass(&self, index: usize) -> usize {
        self.live_at_pass_end[index % self.passes.len()]
    }

    /// Number of events in the file's passes (set-up excluded).
    pub fn pass_event_count(&self) -> usize {
        self.passes.iter().map(|range| range.len()).sum()
    }
}

/// A malformed trace: `file:line: message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// The file as given.
    pub file: String,
    /// 1-based line number (0 when the file could not be read).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        }
    }
}

impl std::error::Error for ParseError {}

/// What the parser knows about a block id.
#[derive(Clone, Copy)]
enum Block {
    Live {
        /// `None` for size-0 blocks (no slot, nothing to free).
        slot: Option<u32>,
        size: usize,
        line: usize,
        in_setup: bool,
    },
    Freed {
        line: usize,
    },
}

struct Parser<'a> {
    file: &'a str,
    line: usize,
    blocks: HashMap<u64, Block>,
    free_slots: Vec<u32>,
    slots: u32,
    events: Vec<Event>,
    live: usize,
    peak: usize,
    /// Set-up blocks freed during the passes: (slot, size).
    setup_freed: Vec<(u32, usize)>,
}

impl<'a> Parser<'a> {
    fn new(file: &'a str) -> Self {
        Self {
            file,
            line: 0,
            blocks: HashMap::new(),
            free_slots: Vec::new(),
            slots: 0,
            events: Vec::new(),
            live: 0,
            peak: 0,
            setup_freed: Vec::new(),
        }
    }

    fn error(&self, message: impl Into<String>) -> ParseError {
        ParseError {
            file: self.file.to_string(),
            line: self.line,
            message: message.into(),
        }
    }

    fn run(mut self, text: &str, name: String) -> Result<Trace, ParseError> {
        let mut lines = text.lines();
        self.line = 1;
        match lines.next() {
            None => return Err(self.error(format!("empty file, expected header `{HEADER}`"))),
            Some(first) if first.trim_end() == HEADER => {}
            Some(first) if first.starts_with("# caching-allocator trace") => {
                return Err(self.error(format!(
                    "unsupported trace version `{}`, expected `{HEADER}`",
                    first.trim_end()
                )));
            }
            Some(_) => {
                return Err(self.error(format!("missing header: first line must be `{HEADER}`")));
            }
        }

        let mut passes: Vec<Range<usize>> = Vec::new();
        let mut allocs_per_pass: Vec<usize> = Vec::new();
        let mut live_at_pass_end: Vec<usize> = Vec::new();
        let mut live_after_setup = 0;
        let mut zero_size_allocs = 0;

        for (index, raw) in lines.enumerate() {
            self.line = index + 2;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_ascii_whitespace();
            let kind = fields.next().unwrap_or_default();
            match kind {
                "p" => {
                    let number: usize = self.number(fields.next(), "pass number", "p N")?;
                    self.no_more(fields.next(), "p N")?;
                    if number != passes.len() {
                        return Err(self.error(format!(
                            "pass {number} out of order: expected `p {}`",
                            passes.len()
                        )));
                    }
                    let start = self.events.len();
                    if let Some(previous) = passes.last_mut() {
                        previous.end = start;
                        live_at_pass_end.push(self.live);
                    } else {
                        live_after_setup = self.live;
                    }
                    passes.push(start..start);
                    allocs_per_pass.push(0);
                }
                "a" => {
                    let id: u64 = self.id(fields.next(), "a ID SIZE")?;
                    let size: usize = self.number(fields.next(), "size", "a ID SIZE")?;
                    self.no_more(fields.next(), "a ID SIZE")?;
                    if size > isize::MAX as usize - (ALIGN - 1) {
                        return Err(self.error(format!("size {size} is too large for any block")));
                    }
                    if let Some(previous) = self.blocks.get(&id) {
                        let first = match previous {
                            Block::Live { line, .. } | Block::Freed { line } => *line,
                        };
                        let first = match previous {
                            Block::Live { .. } => format!("allocated at line {first}"),
                            Block::Freed { .. } => format!("already used, freed at line {first}"),
                        };
                        return Err(self.error(format!("duplicate block id {id} ({first})")));
                    }
                    let slot = if size == 0 {
                        zero_size_allocs += 1;
                        None
                    } else {
                        let slot = self.take_slot();
                        self.events.push(Event::Alloc { slot, size });
                        // Each size fits a layout, but their sum may not.
                        self.live = self.live.checked_add(size).ok_or_else(|| {
                            self.error("live bytes overflow: more than fits in memory")
                        })?;
                        self.peak = self.peak.max(self.live);
                        if let Some(count) = allocs_per_pass.last_mut() {
                            *count += 1;
                        }
                        Some(slot)
                    };
                    self.blocks.insert(
                        id,
                        Block::Live {
                            slot,
                            size,
                            line: self.line,
                            in_setup: passes.is_empty(),
                        },
                    );
                }
                "f" => {
                    let id: u64 = self.id(fields.next(), "f ID")?;
                    self.no_more(fields.next(), "f ID")?;
                    let block = match self.blocks.get(&id) {
                        None => return Err(self.error(format!("free of unknown block id {id}"))),
                        Some(Block::Freed { line }) => {
                            return Err(self.error(format!(
                                "free of already freed block id {id} (freed at line {line})"
                            )));
                        }
                        Some(block) => *block,
                    };
                    if let Block::Live {
                        slot: Some(slot),
                        size,
                        in_setup,
                        ..
                    } = block
                    {
                        self.events.push(Event::Free { slot, size });
                        self.live -= size;
                        self.free_slots.push(slot);
                        if in_setup && !passes.is_empty() {
                            self.setup_freed.push((slot, size));
                        }
                    }
                    self.blocks.insert(id, Block::Freed { line: self.line });
                }
                other => {
                    return Err(self.error(format!(
                        "unknown event `{other}` (expected `p`, `a`, `f` or a `#` comment)"
                    )));
                }
            }
        }

        let Some(last) = passes.last_mut() else {
            return Err(self.error("no passes: the trace has no `p 0` line"));
        };
        last.end = self.events.len();
        live_at_pass_end.push(self.live);

        // Blocks live at the end, in slot order so runs are reproducible.
        let mut live_at_end: Vec<(bool, Event)> = self
            .blocks
            .values()
            .filter_map(|block| match *block {
                Block::Live {
                    slot: Some(slot),
                    size,
                    in_setup,
                    ..
                } => Some((in_setup, Event::Free { slot, size })),
                _ => None,
            })
            .collect();
        live_at_end.sort_by_key(|(_, event)| match event {
            Event::Alloc { slot, .. } | Event::Free { slot, .. } => *slot,
        });
        let mut wrap: Vec<Event> = live_at_end
            .iter()
            .filter(|(in_setup, _)| !in_setup)
            .map(|(_, event)| *event)
            .collect();
        wrap.extend(
            self.setup_freed
                .iter()
                .map(|&(slot, size)| Event::Alloc { slot, size }),
        );

        Ok(Trace {
            name,
            setup: 0..passes[0].start,
            passes,
            wrap,
            blocks_live_at_end: live_at_end.len(),
            slots: self.slots as usize,
            peak_live_bytes: self.peak,
            live_after_setup,
            live_at_pass_end,
            allocs_per_pass,
            zero_size_allocs,
            events: self.events,
        })
    }

    fn take_slot(&mut self) -> u32 {
        self.free_slots.pop().unwrap_or_else(|| {
            self.slots += 1;
            self.slots - 1
        })
    }

    fn number<T: std::str::FromStr>(
        &self,
        field: Option<&str>,
        what: &str,
        form: &str,
    ) -> Result<T, ParseError>
    where
        T::Err: fmt::Display,
    {
        let Some(field) = field else {
            return Err(self.error(format!("missing {what}: expected `{form}`")));
        };
        field
            .parse()
            .map_err(|error| self.error(format!("bad {what} `{field}`: {error}")))
    }

    fn id(&self, field: Option<&str>, form: &str) -> Result<u64, ParseError> {
        let id: u64 = self.number(field, "block id", form)?;
        if id == 0 {
            return Err(self.error("bad block id `0`: ids are positive"));
        }
        Ok(id)
    }

    fn no_more(&self, field: Option<&str>, form: &str) -> Result<(), ParseError> {
        match field {
            None => Ok(()),
            Some(extra) => Err(self.error(format!(
                "unexpected extra field `{extra}`: expected `{form}`"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Trace, ParseError> {
        Trace::parse(text, "t.trace", "t.trace".into())
    }

    #[test]
    fn slots_are_reused_and_live_bytes_tracked() {
        let trace = parse(&format!(
            "{HEADER}\np 0\na 1 100\na 2 50\nf 1\na 3 10\np 1\nf 2\nf 3\na 4 0\nf 4\n"
        ))
        .unwrap();
        assert_eq!(trace.slots, 2);
        assert_eq!(trace.peak_live_bytes, 150);
        assert_eq!(trace.live_at_pass_end, vec![60, 0]);
        assert_eq!(trace.allocs_per_pass, vec![3, 0]);
        assert_eq!(trace.zero_size_allocs, 1);
        assert_eq!(trace.events.len(), 6);
        assert_eq!(
            trace.events[3],
            Event::Alloc { slot: 0, size: 10 },
            "slot 0 is reused after block 1 is freed"
        );
    }
}
