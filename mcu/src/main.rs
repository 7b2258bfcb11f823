//! The knock protocol on a microcontroller: this firmware runs the test
//! vectors of `docs/PROTOCOL.md` with `knockd-proto` on a Cortex-M4F (QEMU's
//! mps2-an386, through `cargo xtask mcu`), then times one device's work for
//! a knock and measures what it takes of the chip. It prints `name value`
//! lines over semihosting and exits 0 only if every vector passed.
//!
//! Time is counted with SysTick on the core clock (25 MHz on this board)
//! while QEMU runs with `-icount shift=0`: one instruction per virtual
//! nanosecond, so a tick is 40 instructions. QEMU counts instructions, not
//! cycles: a real Cortex-M4 spends more cycles than instructions (loads,
//! taken branches), so the figures are instructions executed, and the
//! firmware checks the tick rate against a loop of known length first.
#![no_std]
#![no_main]

use core::{
    fmt::Write as _,
    ptr::{addr_of, read_volatile, write_volatile},
};

use cortex_m::peripheral::{SYST, syst::SystClkSource};
use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hio};
use knockd_proto::{DeviceKey, DoorKeys, DoorParams, Kind, Reply, Status, sequence, vectors};

/// Instructions per SysTick tick: 1 GHz of icount time over the board's
/// 25 MHz core clock.
const INSTRUCTIONS_PER_TICK: u32 = 40;
/// What an untouched stack word holds.
const PAINT: u32 = 0x5afe_c0de;

unsafe extern "C" {
    // From cortex-m-rt's link.x.
    static __sidata: u32;
    static __sdata: u32;
    static __edata: u32;
    static __ebss: u32;
    static __sheap: u32;
    static _stack_start: u32;
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    if let Ok(mut out) = hio::hstdout() {
        let _ = writeln!(out, "panic: {info}");
    }
    exit(debug::EXIT_FAILURE)
}

/// Ends the run: QEMU exits with `status` (semihosting).
fn exit(status: debug::ExitStatus) -> ! {
    debug::exit(status);
    loop {
        cortex_m::asm::wfi();
    }
}

/// SysTick ticks `work` takes.
fn ticks(work: impl FnOnce()) -> u32 {
    let start = SYST::get_current();
    work();
    let end = SYST::get_current();
    // SysTick counts down from its 24-bit reload.
    start.wrapping_sub(end) & 0x00ff_ffff
}

/// One device's work for an open: derive the door's keys, build the three
/// knocks, open the server's reply. Returns the reply's port.
fn knock_once(key: &DeviceKey, sealed: &[u8; knockd_proto::REPLY_LEN]) -> u16 {
    let keys = DoorKeys::derive(key, "ssh");
    let knocks = sequence(&keys, &params(), Kind::Open, 1_740_000_012_345, NONCE, None);
    let mut sum = 0u16;
    for (port, payload) in &knocks {
        sum = sum.wrapping_add(*port).wrapping_add(u16::from(payload[67]));
    }
    let reply = Reply::open(sealed, &keys, &NONCE).expect("the sealed reply opens");
    core::hint::black_box(sum);
    reply.port
}

const NONCE: [u8; 16] = [0xa0; 16];

fn params() -> DoorParams {
    DoorParams {
        knock_ports: 7000..=7999,
        knocks: 3,
        step_secs: 30,
    }
}

#[entry]
fn main() -> ! {
    let mut out = hio::hstdout().expect("semihosting stdout");
    let mut peripherals = cortex_m::Peripherals::take().expect("first take");
    let syst = &mut peripherals.SYST;
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(0x00ff_ffff);
    syst.clear_current();
    syst.enable_counter();

    // The tick rate, checked: 300,000 iterations of a three-instruction
    // loop (nop, subs, bne).
    let loop_ticks = ticks(|| unsafe {
        core::arch::asm!(
            "2:", "nop", "subs {n}, {n}, #1", "bne 2b",
            n = inout(reg) 300_000u32 => _,
        );
    });
    let _ = writeln!(out, "calibration_loop_instructions 900000");
    let _ = writeln!(
        out,
        "calibration_loop_measured {}",
        loop_ticks * INSTRUCTIONS_PER_TICK
    );

    // The vectors first: nothing else counts if they fail.
    let passed = match vectors::check(vectors::PROTOCOL_MD) {
        Ok(n) => n,
        Err(failure) => {
            let _ = writeln!(out, "vectors_failed {failure}");
            exit(debug::EXIT_FAILURE)
        }
    };
    let _ = writeln!(out, "vectors_passed {passed}");

    // The server's side of one exchange, to have a reply to open.
    let key = DeviceKey(core::array::from_fn(|i| i as u8));
    let server = DoorKeys::derive(&key, "ssh");
    let sealed = Reply {
        kind: Kind::Open,
        nonce: NONCE,
        status: Status::Granted,
        port: 40123,
        expires_in_secs: 29,
        server_time_ms: 1_740_000_012_999,
    }
    .seal(&server);

    // The device's work, in parts and whole.
    let mut keys = None;
    let derive = ticks(|| keys = Some(DoorKeys::derive(&key, "ssh")));
    let keys = keys.expect("derived");
    let mut knocks = None;
    let build = ticks(|| {
        knocks = Some(sequence(
            &keys,
            &params(),
            Kind::Open,
            1_740_000_012_345,
            NONCE,
            None,
        ))
    });
    core::hint::black_box(&knocks);
    let open = ticks(|| {
        core::hint::black_box(Reply::open(&sealed, &keys, &NONCE).ok());
    });
    // The whole of it, with the stack painted first to find its deepest
    // point.
    let painted_from = addr_of!(__sheap) as usize;
    let sp = cortex_m::register::msp::read() as usize;
    let mut at = painted_from;
    while at + 256 < sp {
        unsafe { write_volatile(at as *mut u32, PAINT) };
        at += 4;
    }
    let mut port = 0;
    let whole = ticks(|| port = knock_once(&key, &sealed));
    let mut deepest = painted_from;
    while deepest < sp && unsafe { read_volatile(deepest as *const u32) } == PAINT {
        deepest += 4;
    }
    let stack_top = addr_of!(_stack_start) as usize;
    let _ = writeln!(out, "reply_port {port}");
    let _ = writeln!(
        out,
        "derive_instructions {}",
        derive * INSTRUCTIONS_PER_TICK
    );
    let _ = writeln!(
        out,
        "sequence_instructions {}",
        build * INSTRUCTIONS_PER_TICK
    );
    let _ = writeln!(
        out,
        "reply_open_instructions {}",
        open * INSTRUCTIONS_PER_TICK
    );
    let _ = writeln!(out, "knock_instructions {}", whole * INSTRUCTIONS_PER_TICK);
    let _ = writeln!(out, "knock_stack_bytes {}", stack_top - deepest);

    // What the firmware occupies, from the link: flash holds the code, the
    // constants and the initial values of .data; RAM holds .data and .bss
    // (the stack comes on top).
    let (sidata, sdata, edata, ebss) = (
        addr_of!(__sidata) as usize,
        addr_of!(__sdata) as usize,
        addr_of!(__edata) as usize,
        addr_of!(__ebss) as usize,
    );
    let _ = writeln!(out, "flash_bytes {}", sidata + (edata - sdata));
    let _ = writeln!(
        out,
        "flash_protocol_md_bytes {}",
        vectors::PROTOCOL_MD.len()
    );
    let _ = writeln!(out, "ram_static_bytes {}", ebss - sdata);
    exit(debug::EXIT_SUCCESS)
}
