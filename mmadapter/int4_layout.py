"""Where PyTorch's 4-bit CPU kernel keeps each code, learnt by a round trip instead of assumed.

`aten._convert_weight_to_int4pack_for_cpu` packs two 4-bit codes per byte in a private layout that
depends on the CPU capability the process dispatches to (`ATEN_CPU_CAPABILITY`): blocks of 64 rows
under AVX-512, 32 under AVX2, neighbouring rows paired in the scalar build, partial blocks packed
differently again. Reading codes back with one assumed layout silently gives wrong weights on the
other CPUs, so nothing here assumes one. Every known layout has the form

    code (row r, input k) is nibble nib[r] of byte  K * a[r] + k * h[r] + c[r]

(rows grouped into blocks whose size grows linearly with the number of inputs K). The per-row a, h,
c and nib are learnt by packing probes whose codes spell out row and input indices, for two small K,
and grouped into blocks of consecutive rows (runs of blocks packed alike are read back with a reshape
each); the result is then checked against a pack of random codes at the real shape. A layout outside
this form is refused with an error naming the capability; it is never guessed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor


class Int4LayoutError(RuntimeError):
    """The 4-bit kernel packs codes in a layout this module does not recognise."""


def cpu_capability() -> str:
    """The kernel family PyTorch dispatches to in this process (e.g. AVX2, AVX512, DEFAULT)."""
    return torch.backends.cpu.get_cpu_capability()


def pack(codes: Tensor) -> Tensor:
    """The kernel's own packing of codes [out, in] (0..15) -> [out, in / 2] uint8."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


@dataclass(frozen=True)
class _BlockRun:
    """Consecutive row blocks packed alike: block i holds rows first_row + i*len(order) onwards, its bytes
    [n_inputs, len(order) / 2] start at byte n_inputs * (block_offset + i * len(order) / 2), and its row j is
    nibble column order[j] of the block's bytes split into (low nibbles | high nibbles)."""

    first_row: int
    n_blocks: int
    block_offset: int
    order: Tensor  # [rows per block] int64


class Int4Layout:
    """Where the codes of an [n_rows, n_inputs] weight sit in the kernel's packed bytes, as runs of blocks,
    so reading codes back is a few reshapes and one column gather per run, not one index per code."""

    def __init__(self, runs: list[_BlockRun], n_inputs: int) -> None:
        self.runs, self.n_inputs = runs, n_inputs

    def unpack(self, packed: Tensor, start: int, end: int) -> Tensor:
        """Codes [end - start, n_inputs] (uint8, 0..15) of rows start..end from the packed bytes."""
        flat, k = packed.reshape(-1), self.n_inputs
        parts = []
        for run in self.runs:
            rows = len(run.order)
            last_row = run.first_row + run.n_blocks * rows
            if last_row <= start or run.first_row >= end:
                continue
            b0 = (max(start, run.first_row) - run.first_row) // rows
            b1 = -(-(min(end, last_row) - run.first_row) // rows)
            first_byte = k * (run.block_offset + b0 * rows // 2)
            blocks = flat[first_byte:first_byte + (b1 - b0) * k * rows // 2].view(b1 - b0, k, rows // 2)
            nibbles = torch.cat((blocks & 15, blocks >> 4), dim=2)  # [blocks, in, rows]: low nibbles, then high
            by_column = nibbles.transpose(1, 2).contiguous()  # [blocks, rows, in]: nibble column j's codes
            codes = by_column[:, run.order.to(packed.device)].reshape(-1, k)  # [blocks * rows, in]
            offset = run.first_row + b0 * rows
            parts.append(codes[max(start, offset) - offset:min(end, last_row) - offset])
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _runs(a: Tensor, h: Tensor, c: Tensor, nib: Tensor, n_rows: int) -> list[_BlockRun]:
    """Group rows into blocks (the rows sharing a block offset a, consecutive, 2h of them) and consecutive
    blocks of one shape into runs; a placement that does not split that way is refused."""
    runs: list[_BlockRun] = []
    row = 0
    while row < n_rows:
        size = 2 * int(h[row])
        block = slice(row, row + size)
        if size < 2 or row + size > n_rows or not bool((a[block] == a[row]).all()) or not bool((h[block] == h[row]).all()):
            raise Int4LayoutError(_unknown(f"{n_rows} rows (rows of a block are not consecutive)"))
        order = nib[block] * (size // 2) + c[block]  # nibble column of each row of the block
        if not torch.equal(order.sort().values, torch.arange(size)):
            raise Int4LayoutError(_unknown(f"{n_rows} rows (a block does not hold each of its rows once)"))
        last = runs[-1] if runs else None
        if (last is not None and torch.equal(last.order, order)
                and int(a[row]) == last.block_offset + last.n_blocks * size // 2):
            runs[-1] = _BlockRun(last.first_row, last.n_blocks + 1, last.block_offset, last.order)
        else:
            runs.append(_BlockRun(row, 1, int(a[row]), order))
        row += size
    return runs


@functools.cache
def _row_placement(n_rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """a, h, c, nib per row (see the module docstring), from probes with 2 and 4 inputs."""
    places = {n_inputs: _nibble_positions(n_rows, n_inputs) for n_inputs in (2, 4)}  # [rows, K] nibble index
    byte2, byte4 = places[2] // 2, places[4] // 2
    a = (byte4[:, 0] - byte2[:, 0]) // 2  # block offset per input of K
    h = byte2[:, 1] - byte2[:, 0]
    c = byte2[:, 0] - 2 * a
    nib = places[2][:, 0] % 2
    for n_inputs, place in places.items():
        k = torch.arange(n_inputs)
        predicted = 2 * (a[:, None] * n_inputs + k * h[:, None] + c[:, None]) + nib[:, None]
        if not torch.equal(predicted, place):
            raise Int4LayoutError(_unknown(f"{n_rows} rows x {n_inputs} inputs"))
    return a, h, c, nib


def _nibble_positions(n_rows: int, n_inputs: int) -> Tensor:
    """For each code (row, input): the index of the nibble the kernel stores it in (byte * 2 + high)."""
    index = torch.arange(n_rows * n_inputs).view(n_rows, n_inputs)
    n_digits = max(1, (n_rows * n_inputs - 1).bit_length() + 3) // 4
    found = torch.zeros(n_rows * n_inputs, dtype=torch.int64)  # per nibble: the code index stored there
    for d in range(n_digits):
        nibbles = pack((index >> (4 * d)) & 15).reshape(-1)
        found |= torch.stack((nibbles & 15, nibbles >> 4), -1).reshape(-1).to(torch.int64) << (4 * d)
    if not torch.equal(found.sort().values, torch.arange(found.numel())):
        raise Int4LayoutError(_unknown(f"{n_rows} rows x {n_inputs} inputs (not a permutation of the codes)"))
    positions = torch.empty_like(found)
    positions[found] = torch.arange(found.numel())
    return positions.view(n_rows, n_inputs)


@functools.cache
def layout_for(n_rows: int, n_inputs: int) -> Int4Layout:
    """The learnt layout of an [n_rows, n_inputs] weight, checked on random codes at that shape (once per
    shape and process: layers of one shape share it)."""
    layout = Int4Layout(_runs(*_row_placement(n_rows), n_rows), n_inputs)
    codes = torch.randint(0, 16, (n_rows, n_inputs), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if not torch.equal(layout.unpack(pack(codes), 0, n_rows), codes):
        raise Int4LayoutError(_unknown(f"{n_rows} rows x {n_inputs} inputs (random codes do not read back)"))
    return layout


def _unknown(what: str) -> str:
    return (f"PyTorch {torch.__version__} packs 4-bit weights of {what} in a layout mmadapter does not recognise "
            f"on this CPU (kernel capability {cpu_capability()}). Use dtype='int8' or float32, or run with "
            f"ATEN_CPU_CAPABILITY=avx2 (or default), and please report the capability and PyTorch version.")
