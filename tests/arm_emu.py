"""Run LLVM IR functions as AArch64 machine code on an x86 host: compile for AArch64 with
llvmlite, place the object file's sections in an emulated address space, apply its relocations,
and call a function in unicorn (QEMU's CPU emulator; its ``max`` CPU has the dot-product
extension). For testing the ARM kernel path (``_kernels_ir``'s ``neondot``) where no ARM CPU is.

Only what our kernels' object code needs: the small code model's page-relative relocations
(``adrp`` + a low-12-bit add or load), 64-bit absolute and 32-bit relative words; anything else is refused.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import llvmlite.binding as llvm
import numpy as np

TRIPLE = "aarch64-unknown-linux-gnu"
CODE_BASE = 0x10000
DATA_BASE = 0x10000000
STACK_TOP = 0x7F000000
STACK_SIZE = 1 << 20
RETURN_TO = 0xDEAD0000  # the link register at the call: emulation stops there

# ELF64 relocation types (AArch64) and, for the load forms, the access size's shift
_ABS64, _PREL32, _PREL_PG_HI21, _ADD_LO12 = 257, 261, 275, 277
_LDST_SHIFT = {278: 0, 284: 1, 285: 2, 286: 3, 299: 4}


def compile_object(module_ir: str, features: str = "+neon,+dotprod") -> bytes:
    """IR text (an AArch64 module) -> ELF object bytes (optimized as numba would: O3)."""
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    mod = llvm.parse_assembly(module_ir)
    mod.verify()
    tm = llvm.Target.from_triple(TRIPLE).create_target_machine(cpu="generic", features=features, opt=3,
                                                                reloc="static", codemodel="small")
    return bytes(tm.emit_object(mod))


@dataclass
class _Section:
    name: str
    kind: int
    flags: int
    offset: int
    size: int
    link: int
    info: int
    align: int


def _sections(obj: bytes) -> list[_Section]:
    shoff, = struct.unpack_from("<Q", obj, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", obj, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + i * shentsize) for i in range(shnum)]
    strtab = raw[shstrndx][4]

    def name(off: int) -> str:
        end = obj.index(b"\0", strtab + off)
        return obj[strtab + off : end].decode()

    return [_Section(name(r[0]), r[1], r[2], r[4], r[5], r[6], r[7], max(r[8], 1)) for r in raw]


class ArmObject:
    """One object file laid out in an emulator: its allocated sections at fixed addresses, its
    symbols resolved, its relocations applied."""

    def __init__(self, obj: bytes) -> None:
        from unicorn import UC_ARCH_ARM64, UC_MODE_ARM, Uc
        from unicorn.arm64_const import UC_ARM64_REG_CPACR_EL1, UC_CPU_ARM64_MAX

        secs = _sections(obj)
        self.base: dict[int, int] = {}
        at = CODE_BASE
        for i, s in enumerate(secs):
            if s.flags & 2:  # SHF_ALLOC
                at = (at + max(s.align, 16) - 1) // max(s.align, 16) * max(s.align, 16)
                self.base[i] = at
                at += s.size
        self.image = bytearray(at - CODE_BASE + 16)
        for i, a in self.base.items():
            s = secs[i]
            if s.kind != 8:  # not NOBITS
                self.image[a - CODE_BASE : a - CODE_BASE + s.size] = obj[s.offset : s.offset + s.size]
        symtab = next(s for s in secs if s.kind == 2)
        strtab = secs[symtab.link]
        self.symbols: dict[str, int] = {}
        addrs = []
        for k in range(symtab.size // 24):
            st_name, _, _, shndx, value, _ = struct.unpack_from("<IBBHQQ", obj, symtab.offset + 24 * k)
            addr = self.base[shndx] + value if shndx in self.base else 0
            addrs.append(addr)
            if st_name:
                end = obj.index(b"\0", strtab.offset + st_name)
                self.symbols[obj[strtab.offset + st_name : end].decode()] = addr
        for s in secs:
            if s.kind == 4 and s.info in self.base:  # RELA for an allocated section
                for k in range(s.size // 24):
                    off, info, addend = struct.unpack_from("<QQq", obj, s.offset + 24 * k)
                    self._relocate(self.base[s.info] + off, info & 0xFFFFFFFF, addrs[info >> 32] + addend)
        self.uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM, cpu=UC_CPU_ARM64_MAX)
        size = (len(self.image) + 0xFFF) & ~0xFFF
        self.uc.mem_map(CODE_BASE, size)
        self.uc.mem_write(CODE_BASE, bytes(self.image))
        self.uc.mem_map(STACK_TOP - STACK_SIZE, STACK_SIZE)
        self.uc.mem_map(RETURN_TO, 0x1000)
        cpacr = self.uc.reg_read(UC_ARM64_REG_CPACR_EL1)
        self.uc.reg_write(UC_ARM64_REG_CPACR_EL1, cpacr | (3 << 20))  # FP/SIMD instructions on
        self.data_end = DATA_BASE

    def _relocate(self, place: int, kind: int, target: int) -> None:
        i = place - CODE_BASE
        if kind == _ABS64:
            struct.pack_into("<Q", self.image, i, target & (2**64 - 1))
            return
        if kind == _PREL32:  # (unwind tables)
            struct.pack_into("<I", self.image, i, (target - place) & 0xFFFFFFFF)
            return
        insn, = struct.unpack_from("<I", self.image, i)
        if kind == _PREL_PG_HI21:
            pages = ((target & ~0xFFF) - (place & ~0xFFF)) >> 12
            insn &= ~((3 << 29) | (0x7FFFF << 5))
            insn |= ((pages & 3) << 29) | (((pages >> 2) & 0x7FFFF) << 5)
        elif kind == _ADD_LO12:
            insn = (insn & ~(0xFFF << 10)) | ((target & 0xFFF) << 10)
        elif kind in _LDST_SHIFT:
            insn = (insn & ~(0xFFF << 10)) | (((target & 0xFFF) >> _LDST_SHIFT[kind]) << 10)
        else:
            raise NotImplementedError(f"AArch64 relocation type {kind}")
        struct.pack_into("<I", self.image, i, insn)

    def put(self, a: np.ndarray) -> int:
        """Copy ``a`` into emulated memory (64-byte aligned, with slack after it for the kernels'
        prefetches) -> its address."""
        data = np.ascontiguousarray(a).tobytes()
        addr = self.data_end
        size = (len(data) + 4096 + 0xFFF) & ~0xFFF
        self.uc.mem_map(addr, size)
        self.uc.mem_write(addr, data)
        self.data_end = addr + size
        return addr

    def get(self, addr: int, like: np.ndarray) -> np.ndarray:
        return np.frombuffer(bytes(self.uc.mem_read(addr, like.nbytes)), dtype=like.dtype).reshape(like.shape)

    def call(self, name: str, args: list[int], ret: str = "f32") -> float | int | None:
        """Call ``name`` with integer arguments (the first 8 in x0-x7, the rest on the stack, as
        AAPCS64 passes them); ``ret`` "f32" returns s0, "i32" w0, "i64" x0, "void" None."""
        from unicorn.arm64_const import UC_ARM64_REG_LR, UC_ARM64_REG_S0, UC_ARM64_REG_SP, UC_ARM64_REG_X0

        sp = STACK_TOP - 4096
        for k, v in enumerate(args):
            if k < 8:
                self.uc.reg_write(UC_ARM64_REG_X0 + k, int(v) & (2**64 - 1))
            else:
                self.uc.mem_write(sp + 8 * (k - 8), struct.pack("<Q", int(v) & (2**64 - 1)))
        self.uc.reg_write(UC_ARM64_REG_SP, sp)
        self.uc.reg_write(UC_ARM64_REG_LR, RETURN_TO)
        self.uc.emu_start(self.symbols[name], RETURN_TO, count=200_000_000)
        if ret == "f32":
            bits = self.uc.reg_read(UC_ARM64_REG_S0) & 0xFFFFFFFF
            return float(np.array([bits], np.uint32).view(np.float32)[0])
        if ret == "i32":
            w0 = self.uc.reg_read(UC_ARM64_REG_X0) & 0xFFFFFFFF
            return int(np.array([w0], np.uint32).view(np.int32)[0])
        if ret == "i64":
            return int(np.array([self.uc.reg_read(UC_ARM64_REG_X0)], np.uint64).view(np.int64)[0])
        return None
