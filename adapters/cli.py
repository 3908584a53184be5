"""`cdd-zoo list|show|verify|export|install`: inspect and manage zoo entries."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..runtime.serving.settings import ZooSettings
from .fingerprint import unet_fingerprint
from .zoo import (
    Manifest,
    ZooError,
    default_backbone_dir,
    install_entry,
    list_entries,
    load_entry,
    verify_entry,
)


def _resolve(ref: str, zoos: list[Path]) -> Path:
    """A path to an entry folder, or the name of an entry in the first of `zoos` that has it."""
    p = Path(ref)
    if p.is_dir():
        return p
    for zoo in zoos:
        if (zoo / ref).is_dir():
            return zoo / ref
    raise ZooError(f"no zoo entry {ref!r}: not a folder and not an entry of {' or '.join(map(str, zoos))}")


def _steps_weights(items: list[str]) -> dict[int, float]:
    """["1=0", "2=1.5"] -> {1: 0.0, 2: 1.5} (ZooError naming a malformed item)."""
    out = {}
    for item in items:
        k, sep, w = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[int(k)] = float(w)
        except ValueError:
            raise ZooError(f"--guidance-at {item!r}: expected STEPS=W, e.g. 1=0") from None
    return out


def _table(rows: list[list[str]]) -> str:
    """Rows as columns, each padded to its longest cell (a row's last cell is not padded)."""
    widths: dict[int, int] = {}
    for row in rows:
        for i, cell in enumerate(row[:-1]):
            widths[i] = max(widths.get(i, 0), len(cell))
    return "\n".join("  ".join([c.ljust(widths[i]) for i, c in enumerate(row[:-1])] + row[-1:]) for row in rows)


def _load_unet(backbone: Path):
    from diffusers import UNet2DConditionModel

    if not (backbone / "unet").is_dir():
        raise ZooError(f"backbone folder {backbone} has no unet/ folder")
    return UNet2DConditionModel.from_pretrained(backbone, subfolder="unet", local_files_only=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cdd-zoo", description=__doc__)
    parser.add_argument("--zoo", type=Path, default=None,
                        help="zoo folder [CDD_ZOO]; default: read the user zoo [CDD_USER_ZOO, ~/.local/share/cdd/zoo] "
                        "and the embedded zoo, as cdd-serve does, and install into the user zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="one line per entry")
    show = sub.add_parser("show", help="print an entry's manifest")
    show.add_argument("entry", help="entry name or folder")
    verify = sub.add_parser("verify", help="check hashes, manifest and (with a backbone) the fingerprint and weights")
    verify.add_argument("entry")
    verify.add_argument("--backbone", type=Path, default=None, help="backbone folder to check the fingerprint against")
    export = sub.add_parser("export", help="write a diffusers ControlNetModel / T2IAdapter folder")
    export.add_argument("entry")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--backbone", type=Path, default=default_backbone_dir())
    install = sub.add_parser("install", help="copy a verified entry (e.g. a training run's) into --zoo (default: "
                             "the user zoo, which cdd-serve serves when run without --zoo)")
    install.add_argument("entry", type=Path, help="entry folder")
    install.add_argument("--name", help="name in the zoo (default: the manifest's)")
    install.add_argument("--half", action="store_true", help="store the weights as float16")
    install.add_argument("--replace", action="store_true", help="overwrite an entry of that name")
    install.add_argument("--sampler", help="default sampler to serve it with (default: the manifest's)")
    install.add_argument("--steps", type=int, help="default steps to serve it with (default: the manifest's)")
    install.add_argument("--strength", type=float, help="default strength to serve it with (super-resolution, edit: "
                         "below 1 a request starts from its input; default: the manifest's)")
    install.add_argument("--guidance", type=float, help="default guidance weight w of a controlnet-guided entry, within "
                         "its trained range (default: the manifest's)")
    install.add_argument("--guidance-at", action="append", default=[], metavar="STEPS=W",
                         help="the default w for requests of that many steps, where another w than --guidance is "
                              "better (e.g. 1=0); repeatable")
    args = parser.parse_args(argv)
    settings = ZooSettings(**({"zoo": args.zoo} if args.zoo is not None else {}))
    zoos = settings.zoo_dirs()

    try:
        if args.command == "list":
            rows = [["NAME", "TASK", "KIND", "MODE", "DEFAULT", "FOLDER"]]
            for zoo in zoos:
                for path, m in list_entries(zoo):
                    if isinstance(m, Manifest):
                        default = f"{m.sampler} x {m.steps}" + (f" strength {m.strength:g}" if m.strength != 1 else "")
                        rows.append([m.name, m.task, m.kind, m.mode, default, str(path)])
                    else:
                        rows.append([path.name, "INVALID", str(m)])
            print(_table(rows))
        elif args.command == "show":
            print(verify_entry(_resolve(args.entry, zoos)).to_json(), end="")
        elif args.command == "verify":
            path = _resolve(args.entry, zoos)
            if args.backbone is None:
                m = verify_entry(path)
            else:
                unet = _load_unet(args.backbone)
                m = load_entry(path, unet, unet_fingerprint(unet)).manifest
            print(f"OK {m.name}: {len(m.files)} file(s) match their sha256" + (", backbone and weights match" if args.backbone else ""))
        elif args.command == "export":
            from .export import export_entry

            unet = _load_unet(args.backbone)
            entry = load_entry(_resolve(args.entry, zoos), unet, unet_fingerprint(unet))
            out = export_entry(entry, args.out)
            print(json.dumps({"exported": str(out), "kind": entry.manifest.kind}))
        elif args.command == "install":
            dest = install_entry(args.entry, settings.install_dir(), name=args.name, half=args.half,
                                 replace=args.replace, sampler=args.sampler, steps=args.steps,
                                 guidance=args.guidance, guidance_steps=_steps_weights(args.guidance_at),
                                 strength=args.strength)
            where = "" if settings.zoo is not None else (
                " (the user zoo, CDD_USER_ZOO: cdd-serve without --zoo serves it beside the embedded zoo)")
            print(f"installed {args.entry} as {dest}{where}")
    except ZooError as e:
        print(f"cdd-zoo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
