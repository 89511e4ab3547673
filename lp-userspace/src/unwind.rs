//! Stack unwinding of a stopped thread with `.eh_frame` CFI (compiled C has no frame pointers).
//!
//! The consistency check needs, for every thread, the return addresses on its stack; it runs
//! while all threads are stopped, so it must be fast: CFI sources are prepared once
//! ([`Unwinder::for_process`] reads and parses every module before the stop), FDEs are found
//! through `.eh_frame_hdr`'s binary-search table, and the unwind row of each address is cached.
//!
//! The unwinder never guesses: when an address has no CFI, a register rule cannot be evaluated
//! or memory cannot be read, it stops and reports the backtrace as incomplete (the caller
//! decides; the stop-mode check treats an incomplete stack as "cannot prove safe").

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, EndianSlice, Evaluation, EvaluationResult,
    LittleEndian, Location, Register, RegisterRule, UnwindContext, UnwindSection, Value,
};

use crate::elf::{Module, SectionRef};
use crate::link::LinkedImage;
use crate::maps;

/// Reads memory of the stopped process (user-proc implements it with `/proc/PID/mem`).
pub trait MemoryReader {
    /// Fills `buf` with the bytes at `addr`; an error if any byte is unreadable.
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Reads this very process's memory (tests, and unwinding ourselves).
pub struct SelfMemory;

impl MemoryReader for SelfMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        // /proc/self/mem checks the mapping and returns EIO instead of faulting.
        use std::os::unix::fs::FileExt;
        std::fs::File::open("/proc/self/mem")?.read_exact_at(buf, addr)
    }
}

/// A `MemoryReader` over `/proc/PID/mem` (the process must be stopped or traced by us).
pub struct ProcMemory {
    file: std::fs::File,
}

impl ProcMemory {
    /// Opens `/proc/PID/mem` for reading.
    pub fn open(pid: i32) -> io::Result<ProcMemory> {
        Ok(ProcMemory {
            file: crate::process::proc_dir::open_shared(
                pid,
                "mem",
                std::fs::OpenOptions::new().read(true),
            )?,
        })
    }
}

impl MemoryReader for ProcMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, addr)
    }
}

/// DWARF register numbers on x86-64.
pub mod reg {
    /// %rbx.
    pub const RBX: u16 = 3;
    /// %rbp.
    pub const RBP: u16 = 6;
    /// %rsp.
    pub const RSP: u16 = 7;
    /// The return address column (%rip).
    pub const RA: u16 = 16;
}

const NREGS: usize = 17;

/// The SysV caller-saved general-purpose registers, by DWARF number: rax, rdx, rcx, rsi, rdi,
/// r8–r11.
const CALLER_SAVED: [u16; 9] = [0, 1, 2, 4, 5, 8, 9, 10, 11];

/// Register values of a frame, indexed by DWARF number (0 rax, 1 rdx, 2 rcx, 3 rbx, 4 rsi,
/// 5 rdi, 6 rbp, 7 rsp, 8–15 r8–r15, 16 rip). `None` = unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Registers(pub [Option<u64>; NREGS]);

impl Registers {
    /// All general-purpose registers of a stopped thread (from `PTRACE_GETREGS`).
    pub fn from_user_regs(r: &libc::user_regs_struct) -> Registers {
        Registers([
            Some(r.rax),
            Some(r.rdx),
            Some(r.rcx),
            Some(r.rbx),
            Some(r.rsi),
            Some(r.rdi),
            Some(r.rbp),
            Some(r.rsp),
            Some(r.r8),
            Some(r.r9),
            Some(r.r10),
            Some(r.r11),
            Some(r.r12),
            Some(r.r13),
            Some(r.r14),
            Some(r.r15),
            Some(r.rip),
        ])
    }

    /// Only what unwinding strictly needs to start; other registers unknown.
    pub fn minimal(rip: u64, rsp: u64, rbp: u64) -> Registers {
        let mut r = Registers::default();
        r.0[reg::RA as usize] = Some(rip);
        r.0[reg::RSP as usize] = Some(rsp);
        r.0[reg::RBP as usize] = Some(rbp);
        r
    }

    fn get(&self, r: u16) -> Option<u64> {
        self.0.get(r as usize).copied().flatten()
    }
}

/// Why the unwind stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The outermost frame (return address column undefined, or zero): the stack is complete.
    End,
    /// No known module contains this address.
    NoModule(u64),
    /// The module has no CFI for this address.
    NoCfi(u64),
    /// A rule or a memory read failed at this address.
    Failed(u64, String),
    /// The depth limit was reached.
    DepthLimit,
}

/// The result of unwinding one thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backtrace {
    /// The instruction pointer the unwind started from.
    pub ip: u64,
    /// Return addresses, innermost first (the ip itself is not included).
    pub return_addresses: Vec<u64>,
    /// Why it stopped.
    pub stop: StopReason,
}

impl Backtrace {
    /// The whole chain was walked up to the outermost frame.
    pub fn complete(&self) -> bool {
        self.stop == StopReason::End
    }
}

/// One region of code with its CFI: a mapped ELF module or a linked patch image.
#[derive(Clone, Debug)]
pub struct CfiSource {
    /// For messages.
    pub name: String,
    /// Runtime code range covered, `[start, end)`.
    pub start: u64,
    /// End of the range.
    pub end: u64,
    bytes: CfiBytes,
    eh_frame_addr: u64,
    hdr_addr: Option<u64>,
    text_addr: u64,
}

/// Where the CFI bytes are: a copy, or the sections of a (memory-mapped) module shared with
/// the module cache, so that a module's `.eh_frame` is never copied.
#[derive(Clone, Debug)]
enum CfiBytes {
    Owned {
        eh_frame: Vec<u8>,
        hdr: Option<Vec<u8>>,
    },
    Module {
        module: Arc<Module>,
        eh_frame: SectionRef,
        hdr: Option<SectionRef>,
    },
}

impl CfiSource {
    /// The CFI of an ELF module loaded with `bias`, covering runtime code `[start, end)`.
    /// `None` when the module has no `.eh_frame`. (Copies the sections; see
    /// [`CfiSource::from_shared_module`].)
    pub fn from_module(module: &Module, bias: u64, start: u64, end: u64) -> Option<CfiSource> {
        let eh = module.eh_frame()?;
        let hdr = module.eh_frame_hdr();
        Some(CfiSource {
            name: module.name().to_string(),
            start,
            end,
            bytes: CfiBytes::Owned {
                eh_frame: module.section_data(eh).to_vec(),
                hdr: hdr.map(|h| module.section_data(h).to_vec()),
            },
            eh_frame_addr: eh.vaddr.wrapping_add(bias),
            hdr_addr: hdr.map(|h| h.vaddr.wrapping_add(bias)),
            text_addr: module.text().map_or(start, |t| t.vaddr.wrapping_add(bias)),
        })
    }

    /// Like [`CfiSource::from_module`], reading the sections in place from the shared module.
    pub fn from_shared_module(
        module: Arc<Module>,
        bias: u64,
        start: u64,
        end: u64,
    ) -> Option<CfiSource> {
        let eh = module.eh_frame()?;
        let hdr = module.eh_frame_hdr();
        Some(CfiSource {
            name: module.name().to_string(),
            start,
            end,
            eh_frame_addr: eh.vaddr.wrapping_add(bias),
            hdr_addr: hdr.map(|h| h.vaddr.wrapping_add(bias)),
            text_addr: module.text().map_or(start, |t| t.vaddr.wrapping_add(bias)),
            bytes: CfiBytes::Module {
                module,
                eh_frame: eh,
                hdr,
            },
        })
    }

    fn eh_frame(&self) -> &[u8] {
        match &self.bytes {
            CfiBytes::Owned { eh_frame, .. } => eh_frame,
            CfiBytes::Module {
                module, eh_frame, ..
            } => module.section_data(*eh_frame),
        }
    }

    fn hdr(&self) -> Option<&[u8]> {
        match &self.bytes {
            CfiBytes::Owned { hdr, .. } => hdr.as_deref(),
            CfiBytes::Module { module, hdr, .. } => hdr.map(|h| module.section_data(h)),
        }
    }

    /// The CFI of a linked patch image (its relocated `.eh_frame`), so threads inside new code
    /// unwind too. `None` when the object had no `.eh_frame`.
    pub fn from_image(image: &LinkedImage) -> Option<CfiSource> {
        let eh = image.eh_frame.clone()?;
        let bytes = image.eh_frame_bytes()?;
        let start = image.text_ranges.iter().map(|r| r.start).min()?;
        let end = image.text_ranges.iter().map(|r| r.end).max()?;
        Some(CfiSource {
            name: format!("patch image at 0x{:x}", image.load_addr),
            start,
            end,
            // Drop the zero terminator: gimli stops on it anyway, keep the section exact.
            bytes: CfiBytes::Owned {
                eh_frame: bytes[..bytes.len().saturating_sub(4)].to_vec(),
                hdr: None,
            },
            eh_frame_addr: eh.start,
            hdr_addr: None,
            text_addr: start,
        })
    }

    /// CFI from raw `.eh_frame` bytes that live at runtime address `eh_frame_addr`, covering
    /// code `[start, end)` — e.g. read back from a target's memory for patch code applied by an
    /// earlier invocation (a trailing zero terminator is harmless).
    pub fn from_eh_frame(
        name: &str,
        start: u64,
        end: u64,
        eh_frame_addr: u64,
        eh_frame: Vec<u8>,
    ) -> CfiSource {
        CfiSource {
            name: name.to_string(),
            start,
            end,
            bytes: CfiBytes::Owned {
                eh_frame,
                hdr: None,
            },
            eh_frame_addr,
            hdr_addr: None,
            text_addr: start,
        }
    }

    fn bases(&self) -> BaseAddresses {
        let b = BaseAddresses::default()
            .set_eh_frame(self.eh_frame_addr)
            .set_text(self.text_addr);
        match self.hdr_addr {
            Some(addr) => b.set_eh_frame_hdr(addr),
            None => b,
        }
    }
}

type Slice<'a> = EndianSlice<'a, LittleEndian>;

/// Cached unwind information of one address: the rules of its row that [`step`] applies, kept
/// compact. (gimli's `UnwindTableRow` holds room for every register rule, ~8 KB: a row cached
/// per address took ~34 fresh heap pages, page faults while every thread of the target was
/// stopped.)
struct Cached {
    source: usize,
    rule: Rule,
    signal: bool,
}

/// How to find the caller's registers from a frame's: its row's CFA rule and register rules.
struct Rule {
    cfa: CfaRule<usize>,
    /// The return address column is undefined: the outermost frame.
    outermost: bool,
    /// Every register with a rule (the return address's included).
    registers: Box<[(Register, RegisterRule<usize>)]>,
}

impl Rule {
    fn of(row: &gimli::UnwindTableRow<usize>) -> Rule {
        Rule {
            cfa: row.cfa().clone(),
            outermost: matches!(row.register(Register(reg::RA)), RegisterRule::Undefined),
            registers: row.registers().cloned().collect(),
        }
    }
}

/// Unwinds threads of one process. Build it before stopping the threads.
///
/// Modules can be added lazily ([`Unwinder::add_lazy`]): their CFI is read the first time an
/// unwind meets an address inside them — a thread's stack usually passes through two to four
/// of the dozens of libraries a process maps. Lazy is never incomplete: a frame in a module not
/// loaded yet loads it, there and then.
pub struct Unwinder {
    /// Append-only ([`Cached::source`] indexes it).
    sources: Vec<CfiSource>,
    /// Indices of `sources` by start address.
    order: Vec<usize>,
    /// Ranges whose CFI is read on first use, by start address.
    pending: Vec<PendingCfi>,
    ctx: Box<UnwindContext<usize>>,
    /// The rule of each address looked up, as an index into `rules` (`None`: no CFI).
    cache: HashMap<u64, Option<usize>>,
    rules: Vec<Cached>,
}

/// Reads the CFI of a lazily added range (`None`: the module has none or cannot be read).
pub type CfiLoader = Box<dyn FnOnce() -> Option<CfiSource> + Send>;

/// A code range whose CFI has not been read yet.
struct PendingCfi {
    start: u64,
    end: u64,
    load: CfiLoader,
}

impl Default for Unwinder {
    fn default() -> Self {
        Unwinder::new()
    }
}

/// Largest number of frames walked.
pub const DEFAULT_MAX_DEPTH: usize = 256;

impl Unwinder {
    /// An unwinder with no CFI yet.
    pub fn new() -> Unwinder {
        Unwinder {
            sources: Vec::new(),
            order: Vec::new(),
            pending: Vec::new(),
            ctx: Box::new(UnwindContext::new()),
            cache: HashMap::new(),
            rules: Vec::new(),
        }
    }

    /// Adds a module or patch image. It takes precedence over ranges added lazily.
    pub fn add(&mut self, source: CfiSource) {
        self.insert(source);
        // An address cached as "no FDE" may be covered now.
        self.cache.clear();
        self.rules.clear();
    }

    fn insert(&mut self, source: CfiSource) -> usize {
        let i = self.sources.len();
        let at = self
            .order
            .partition_point(|&o| self.sources[o].start <= source.start);
        self.sources.push(source);
        self.order.insert(at, i);
        i
    }

    /// Adds the code range `[start, end)` whose CFI `load` reads when an unwind first meets an
    /// address inside it (and that [`Unwinder::add`]ed sources do not cover).
    pub fn add_lazy(&mut self, start: u64, end: u64, load: CfiLoader) {
        let at = self.pending.partition_point(|p| p.start <= start);
        self.pending.insert(at, PendingCfi { start, end, load });
    }

    /// The CFI sources known, every lazily added one read now.
    pub fn sources(&mut self) -> &[CfiSource] {
        for p in std::mem::take(&mut self.pending) {
            if let Some(src) = (p.load)() {
                self.insert(src);
            }
        }
        &self.sources
    }

    /// The CFI sources read so far (lazily added ones only once an unwind needed them).
    pub fn loaded_sources(&self) -> &[CfiSource] {
        &self.sources
    }

    /// The CFI of every module mapped executable in `pid` (and of the vDSO), each read when an
    /// unwind first needs it. Modules that cannot be read are skipped (unwinding through them
    /// stops, reported incomplete).
    pub fn for_process(pid: i32) -> Result<Unwinder, maps::MapsError> {
        let mut u = Unwinder::new();
        let all = maps::read(pid)?;
        for m in maps::modules(&all) {
            let Some((start, end)) = m.exec_span() else {
                continue;
            };
            let path = m.open_path(pid);
            u.add_lazy(
                start,
                end,
                Box::new(move || {
                    let module = Arc::new(Module::open_lazy(&path).ok()?);
                    let bias = m.load_bias(&module)?;
                    CfiSource::from_shared_module(module, bias, start, end)
                }),
            );
        }
        // The vDSO has no file: its ELF image is in memory (clock_gettime & co. run there, and
        // a thread stopped inside must still unwind).
        if let Some(v) = all.iter().find(|m| m.path.as_deref() == Some("[vdso]")) {
            let v = v.clone();
            u.add_lazy(v.start, v.end, Box::new(move || Self::vdso_source(pid, &v)));
        }
        Ok(u)
    }

    /// The CFI of the vDSO mapped at `v` in `pid`, read from its memory.
    pub fn vdso_source(pid: i32, v: &maps::Mapping) -> Option<CfiSource> {
        let mem = ProcMemory::open(pid).ok()?;
        let len = usize::try_from(v.end - v.start).ok()?;
        if len > 1 << 20 {
            return None;
        }
        let mut image = vec![0u8; len];
        mem.read(v.start, &mut image).ok()?;
        let module = Module::parse("[vdso]", image).ok()?;
        let bias = module.load_bias(v.start, 0)?;
        CfiSource::from_shared_module(Arc::new(module), bias, v.start, v.end)
    }

    /// The source covering `addr`, reading a lazily added range's CFI if that is where it is.
    fn source_for(&mut self, addr: u64) -> Option<usize> {
        let i = self
            .order
            .partition_point(|&o| self.sources[o].start <= addr);
        if i > 0 && addr < self.sources[self.order[i - 1]].end {
            return Some(self.order[i - 1]);
        }
        let p = self.pending.partition_point(|p| p.start <= addr);
        if p == 0 || addr >= self.pending[p - 1].end {
            return None;
        }
        let pending = self.pending.remove(p - 1);
        let src = (pending.load)()?;
        Some(self.insert(src))
    }

    /// The rule of `addr` (an index into `rules`), `None` when no FDE covers it.
    fn row_for(&mut self, addr: u64) -> Result<Option<usize>, StopReason> {
        if let Some(c) = self.cache.get(&addr) {
            return Ok(*c);
        }
        let Some(si) = self.source_for(addr) else {
            return Err(StopReason::NoModule(addr));
        };
        let src = &self.sources[si];
        let eh = EhFrame::new(src.eh_frame(), LittleEndian);
        let bases = src.bases();
        let fde = match src.hdr() {
            Some(hdr) => EhFrameHdr::new(hdr, LittleEndian)
                .parse(&bases, 8)
                .ok()
                .and_then(|p| {
                    p.table()?
                        .fde_for_address(&eh, &bases, addr, EhFrame::cie_from_offset)
                        .ok()
                }),
            None => None,
        };
        let fde = match fde {
            Some(f) => Some(f),
            None => eh
                .fde_for_address(&bases, addr, EhFrame::cie_from_offset)
                .ok(),
        };
        let cached = fde.and_then(|fde| {
            let row = fde
                .unwind_info_for_address(&eh, &bases, &mut self.ctx, addr)
                .ok()?;
            Some(Cached {
                source: si,
                rule: Rule::of(row),
                signal: fde.cie().is_signal_trampoline(),
            })
        });
        let index = cached.map(|c| {
            self.rules.push(c);
            self.rules.len() - 1
        });
        self.cache.insert(addr, index);
        Ok(index)
    }

    /// Unwinds one stopped thread from `regs`, at most `max_depth` frames.
    pub fn unwind(
        &mut self,
        regs: &Registers,
        mem: &dyn MemoryReader,
        max_depth: usize,
    ) -> Backtrace {
        let ip = regs.get(reg::RA).unwrap_or(0);
        let mut bt = Backtrace {
            ip,
            return_addresses: Vec::new(),
            stop: StopReason::End,
        };
        let mut regs = *regs;
        // Stack reads come in small pieces close together: fetch them by blocks (one syscall
        // for several frames instead of one per saved register).
        let mem = &BlockCache::new(mem);
        let mut pc = ip;
        // In the innermost frame (and after a signal frame) pc is the interrupted instruction;
        // elsewhere it is a return address, which may lie past the end of the caller's FDE.
        let mut exact = true;
        loop {
            if bt.return_addresses.len() >= max_depth {
                bt.stop = StopReason::DepthLimit;
                return bt;
            }
            let lookup = if exact { pc } else { pc.wrapping_sub(1) };
            let cached = match self.row_for(lookup) {
                Ok(Some(i)) => &self.rules[i],
                Ok(None) => {
                    bt.stop = StopReason::NoCfi(pc);
                    return bt;
                }
                Err(e) => {
                    bt.stop = e;
                    return bt;
                }
            };
            let src = &self.sources[cached.source];
            match step(src, &cached.rule, &regs, mem) {
                Ok(None) => {
                    bt.stop = StopReason::End;
                    return bt;
                }
                Ok(Some(next)) => {
                    let ra = next.get(reg::RA).unwrap_or(0);
                    let (old_sp, new_sp) = (regs.get(reg::RSP), next.get(reg::RSP));
                    if ra == 0 {
                        bt.stop = StopReason::End;
                        return bt;
                    }
                    // The stack grows down: a caller's frame is above. Equal CFA and pc = a loop.
                    if new_sp <= old_sp && ra == pc {
                        bt.stop = StopReason::Failed(pc, "unwinding does not progress".into());
                        return bt;
                    }
                    bt.return_addresses.push(ra);
                    exact = cached.signal;
                    regs = next;
                    pc = ra;
                }
                Err(why) => {
                    bt.stop = StopReason::Failed(pc, why);
                    return bt;
                }
            }
        }
    }
}

/// Reads through `inner` in aligned blocks, remembering the last few.
struct BlockCache<'a> {
    inner: &'a dyn MemoryReader,
    blocks: std::cell::RefCell<Vec<(u64, Box<[u8; BLOCK]>)>>,
}

const BLOCK: usize = 512;

impl<'a> BlockCache<'a> {
    fn new(inner: &'a dyn MemoryReader) -> Self {
        BlockCache {
            inner,
            blocks: std::cell::RefCell::new(Vec::new()),
        }
    }
}

impl MemoryReader for BlockCache<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let base = addr & !(BLOCK as u64 - 1);
        let off = (addr - base) as usize;
        if off + buf.len() > BLOCK {
            return self.inner.read(addr, buf); // straddles blocks: rare, read directly
        }
        let mut blocks = self.blocks.borrow_mut();
        if let Some((_, b)) = blocks.iter().find(|(a, _)| *a == base) {
            buf.copy_from_slice(&b[off..off + buf.len()]);
            return Ok(());
        }
        let mut block = Box::new([0u8; BLOCK]);
        if self.inner.read(base, &mut block[..]).is_err() {
            // The block may cross into an unmapped page: read just what was asked.
            return self.inner.read(addr, buf);
        }
        buf.copy_from_slice(&block[off..off + buf.len()]);
        if blocks.len() >= 16 {
            blocks.remove(0);
        }
        blocks.push((base, block));
        Ok(())
    }
}

fn read_u64(mem: &dyn MemoryReader, addr: u64) -> Result<u64, String> {
    let mut b = [0u8; 8];
    mem.read(addr, &mut b)
        .map_err(|e| format!("cannot read stack at 0x{addr:x}: {e}"))?;
    Ok(u64::from_le_bytes(b))
}

/// The caller's registers, or `None` at the outermost frame.
fn step(
    src: &CfiSource,
    row: &Rule,
    regs: &Registers,
    mem: &dyn MemoryReader,
) -> Result<Option<Registers>, String> {
    let eh = EhFrame::new(src.eh_frame(), LittleEndian);
    let cfa = match &row.cfa {
        CfaRule::RegisterAndOffset { register, offset } => regs
            .get(register.0)
            .ok_or_else(|| format!("CFA register {} unknown", register.0))?
            .wrapping_add(*offset as u64),
        CfaRule::Expression(e) => {
            let expr = e.get(&eh).map_err(|e| e.to_string())?;
            evaluate(expr, None, regs, mem)?
        }
    };
    // The return address column undefined: the outermost frame (_start, clone's child).
    if row.outermost {
        return Ok(None);
    }
    let mut next = *regs;
    // A register without a rule keeps its value only if the callee had to preserve it. The
    // caller-saved ones may have been overwritten by the callee: unknown in the caller (a CFA
    // rule that needs one then fails instead of computing a wrong frame). Signal frames give
    // every register an explicit rule, applied below.
    for r in CALLER_SAVED {
        next.0[r as usize] = None;
    }
    for (r, rule) in row.registers.iter() {
        let value = match rule {
            RegisterRule::Undefined => None,
            RegisterRule::SameValue => regs.get(r.0),
            RegisterRule::Offset(n) => Some(read_u64(mem, cfa.wrapping_add(*n as u64))?),
            RegisterRule::ValOffset(n) => Some(cfa.wrapping_add(*n as u64)),
            RegisterRule::Register(other) => regs.get(other.0),
            RegisterRule::Expression(e) => {
                let expr = e.get(&eh).map_err(|e| e.to_string())?;
                Some(read_u64(mem, evaluate(expr, Some(cfa), regs, mem)?)?)
            }
            RegisterRule::ValExpression(e) => {
                let expr = e.get(&eh).map_err(|e| e.to_string())?;
                Some(evaluate(expr, Some(cfa), regs, mem)?)
            }
            RegisterRule::Constant(v) => Some(*v),
            other => return Err(format!("unsupported register rule {other:?}")),
        };
        if let Some(slot) = next.0.get_mut(r.0 as usize) {
            *slot = value;
        }
    }
    next.0[reg::RSP as usize] = Some(cfa);
    Ok(Some(next))
}

/// Most DWARF operations one CFI expression may execute (glibc's signal frame rules take ~5).
const MAX_EXPRESSION_OPS: u32 = 10_000;

/// Evaluates a DWARF expression of the CFI (`initial` is pushed first for register rules).
fn evaluate(
    expr: gimli::Expression<Slice<'_>>,
    initial: Option<u64>,
    regs: &Registers,
    mem: &dyn MemoryReader,
) -> Result<u64, String> {
    let encoding = gimli::Encoding {
        address_size: 8,
        format: gimli::Format::Dwarf32,
        version: 4,
    };
    let mut eval: Evaluation<Slice<'_>> = expr.evaluation(encoding);
    // CFI can come from the target's memory (the vDSO, patch code of earlier invocations): a
    // looping expression (`DW_OP_skip` backwards) must fail, not hang us while threads are stopped.
    eval.set_max_iterations(MAX_EXPRESSION_OPS);
    if let Some(v) = initial {
        eval.set_initial_value(v);
    }
    let mut state = eval.evaluate().map_err(|e| e.to_string())?;
    let mut steps = 0;
    loop {
        steps += 1;
        if steps > 64 {
            return Err("CFI expression does not terminate".into());
        }
        state = match state {
            EvaluationResult::Complete => break,
            EvaluationResult::RequiresMemory { address, size, .. } => {
                let mut b = [0u8; 8];
                let n = (size as usize).min(8);
                mem.read(address, &mut b[..n])
                    .map_err(|e| format!("cannot read 0x{address:x}: {e}"))?;
                eval.resume_with_memory(Value::Generic(u64::from_le_bytes(b)))
                    .map_err(|e| e.to_string())?
            }
            EvaluationResult::RequiresRegister { register, .. } => {
                let v = regs
                    .get(register.0)
                    .ok_or_else(|| format!("register {} unknown", register.0))?;
                eval.resume_with_register(Value::Generic(v))
                    .map_err(|e| e.to_string())?
            }
            other => return Err(format!("unsupported CFI expression step {other:?}")),
        };
    }
    match eval.as_result().first().map(|p| &p.location) {
        Some(Location::Address { address }) => Ok(*address),
        Some(Location::Value {
            value: Value::Generic(v),
        }) => Ok(*v),
        other => Err(format!("unsupported CFI expression result {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flat piece of "stack" at `base`.
    struct Stack {
        base: u64,
        bytes: Vec<u8>,
    }

    impl MemoryReader for Stack {
        fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
            let off = addr.checked_sub(self.base).map(|o| o as usize);
            match off.and_then(|o| self.bytes.get(o..o + buf.len())) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    Ok(())
                }
                None => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            }
        }
    }

    /// One CIE (CFA = rsp + 8, return address at CFA - 8: a function's entry) and one FDE per
    /// `(start, len, instructions)`, no augmentation (absolute 8-byte addresses).
    fn eh_frame(fdes: &[(u64, u64, &[u8])]) -> Vec<u8> {
        fn entry(out: &mut Vec<u8>, body: &[u8]) {
            let mut body = body.to_vec();
            while !(body.len() + 4).is_multiple_of(8) {
                body.push(0); // DW_CFA_nop
            }
            out.extend((body.len() as u32).to_le_bytes());
            out.extend(body);
        }
        let mut out = Vec::new();
        // CIE id 0, version 1, "", code align 1, data align -8, RA column 16, then
        // DW_CFA_def_cfa rsp+8; DW_CFA_offset r16 at cfa-8.
        entry(
            &mut out,
            &[0, 0, 0, 0, 1, 0, 1, 0x78, 16, 0x0c, 7, 8, 0x90, 1],
        );
        for &(start, len, instructions) in fdes {
            let cie_pointer = (out.len() + 4) as u32; // from the CIE pointer field back to 0
            let mut body = cie_pointer.to_le_bytes().to_vec();
            body.extend(start.to_le_bytes());
            body.extend(len.to_le_bytes());
            body.extend(instructions);
            entry(&mut out, &body);
        }
        out
    }

    /// An unwinder knowing only `cfi`, for code `[start, end)`.
    fn synthetic_unwinder(start: u64, end: u64, cfi: Vec<u8>) -> Unwinder {
        let mut unwinder = Unwinder::new();
        unwinder.add(CfiSource::from_eh_frame(
            "synthetic",
            start,
            end,
            0x10_0000,
            cfi,
        ));
        unwinder
    }

    #[test]
    fn caller_saved_registers_are_unknown_in_the_caller() {
        // inner at 0x1000: the CIE's entry rule. outer at 0x2000: CFA = r10 + 8 (gcc's DRAP
        // register, caller-saved), which the inner function may have overwritten.
        let cfi = eh_frame(&[(0x1000, 0x100, &[]), (0x2000, 0x100, &[0x0c, 10, 8])]);
        let mut unwinder = synthetic_unwinder(0x1000, 0x2100, cfi);
        let mut stack = Stack {
            base: 0x8000,
            bytes: vec![0; 0x2000],
        };
        stack.bytes[..8].copy_from_slice(&0x2010u64.to_le_bytes()); // return into outer
        stack.bytes[0x1000..0x1008].copy_from_slice(&0x4444u64.to_le_bytes()); // junk at r10
        let mut regs = Registers::minimal(0x1000, 0x8000, 0);
        regs.0[10] = Some(0x9000); // the inner function's r10, not the caller's

        let bt = unwinder.unwind(&regs, &stack, DEFAULT_MAX_DEPTH);
        assert_eq!(bt.return_addresses, [0x2010], "no frame made up from r10");
        assert!(
            matches!(&bt.stop, StopReason::Failed(0x2010, why) if why.contains("CFA register 10")),
            "{:?}",
            bt.stop
        );

        // rbx is callee-saved: without a rule it keeps its value, and a CFA rule may use it.
        let cfi = eh_frame(&[(0x1000, 0x100, &[]), (0x2000, 0x100, &[0x0c, 3, 8])]);
        let mut unwinder = synthetic_unwinder(0x1000, 0x2100, cfi);
        regs.0[reg::RBX as usize] = Some(0x9000);
        let bt = unwinder.unwind(&regs, &stack, DEFAULT_MAX_DEPTH);
        assert_eq!(bt.return_addresses, [0x2010, 0x4444]);
    }

    #[test]
    fn a_looping_cfa_expression_fails_instead_of_hanging() {
        // DW_CFA_def_cfa_expression { DW_OP_skip -3 }: jumps back to itself forever.
        let cfi = eh_frame(&[(0x1000, 0x100, &[0x0f, 3, 0x2f, 0xfd, 0xff])]);
        let mut unwinder = synthetic_unwinder(0x1000, 0x1100, cfi);
        let stack = Stack {
            base: 0x8000,
            bytes: vec![0; 0x100],
        };
        let bt = unwinder.unwind(
            &Registers::minimal(0x1010, 0x8000, 0),
            &stack,
            DEFAULT_MAX_DEPTH,
        );
        assert!(bt.return_addresses.is_empty());
        assert!(
            matches!(bt.stop, StopReason::Failed(0x1010, _)),
            "{:?}",
            bt.stop
        );
    }
}
