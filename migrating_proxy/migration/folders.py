"""Which source folders to copy and what they are called on the store.

Pure functions over LIST results (imapclient's `(flags, delimiter, name)` triples with names
already decoded from modified UTF-7), so the rules are testable without a server:

* `\\Noselect` / `\\NonExistent` folders are not copied (their selectable children are).
* Special-use folders (RFC 6154 attributes, XLIST's, then per-provider and well-known names)
  go to the store's folder with the same special use, whatever either side calls it.
* Provider presets skip folders that are not mail (Exchange calendars...) or would copy a
  message once per label (Gmail's All Mail, Important, Starred).
* Other names keep their hierarchy, re-joined with the store's delimiter below its namespace.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ListEntry = tuple[Sequence[bytes], bytes | str | None, str]

ROLES = ("sent", "drafts", "trash", "junk", "archive")
# Store names used when the store has no folder with that special use yet.
DEFAULT_STORE_NAMES = {"sent": "Sent", "drafts": "Drafts", "trash": "Trash", "junk": "Junk",
                       "archive": "Archive"}

# Attribute (lower-case, RFC 6154 and XLIST) -> role; "skip" marks label views of Gmail.
_ATTRIBUTE_ROLES = {
    "\\sent": "sent", "\\drafts": "drafts", "\\trash": "trash", "\\junk": "junk",
    "\\spam": "junk", "\\archive": "archive",
}
_GMAIL_SKIP_ATTRIBUTES = {"\\all", "\\allmail", "\\flagged", "\\starred", "\\important"}
_NOT_SELECTABLE = {"\\noselect", "\\nonexistent"}

# Top-level names (lower-case) servers commonly use for the special folders.
_WELL_KNOWN = {
    "sent": ("sent", "sent messages", "sent items", "sent mail", "gesendet",
             "gesendete objekte", "gesendete elemente", "envoyés", "éléments envoyés",
             "elementos enviados", "posta inviata"),
    "drafts": ("drafts", "draft", "entwürfe", "brouillons", "borradores", "bozze"),
    "trash": ("trash", "deleted items", "deleted messages", "bin", "papierkorb",
              "gelöschte objekte", "gelöschte elemente", "corbeille", "éléments supprimés",
              "papelera", "cestino"),
    "junk": ("junk", "spam", "junk email", "junk e-mail", "junk mail", "bulk mail",
             "spamverdacht", "courrier indésirable"),
    "archive": ("archive", "archives", "archiv"),
}


@dataclass(frozen=True)
class Preset:
    """Provider specifics: folders never copied, and names that imply a special use."""

    skip: tuple[str, ...] = ()  # whole subtrees, compared case-insensitively
    skip_attributes: frozenset[str] = frozenset()
    roles: tuple[tuple[str, str], ...] = ()  # (full name, role)


_EXCHANGE = Preset(
    skip=("Calendar", "Contacts", "Tasks", "Notes", "Journal", "Sync Issues",
          "Conversation History", "Outbox", "RSS Feeds", "Suggested Contacts"),
    roles=(("Sent Items", "sent"), ("Deleted Items", "trash"), ("Junk Email", "junk"),
           ("Junk E-mail", "junk"), ("Drafts", "drafts"), ("Archive", "archive")),
)
_GMAIL_SYSTEM = ("[Gmail]", "[Google Mail]")
PRESETS: dict[str, Preset] = {
    "default": Preset(),
    "gmail": Preset(
        skip=tuple(f"{p}/{n}" for p in _GMAIL_SYSTEM for n in ("All Mail", "Important",
                                                               "Starred")),
        skip_attributes=frozenset(_GMAIL_SKIP_ATTRIBUTES),
        roles=tuple((f"{p}/{n}", role) for p in _GMAIL_SYSTEM for n, role in (
            ("Sent Mail", "sent"), ("Drafts", "drafts"), ("Trash", "trash"), ("Bin", "trash"),
            ("Spam", "junk"))),
    ),
    "exchange": _EXCHANGE,
    "office": _EXCHANGE,
    "domino": Preset(
        skip=("Calendar", "Contacts", "To Do", "ToDo", "Rules", "Stationery"),
        roles=(("Sent", "sent"), ("Drafts", "drafts"), ("Trash", "trash"),
               ("Junk Mail", "junk")),
    ),
}


@dataclass(frozen=True)
class FolderMapping:
    source: str  # decoded source name, as LIST gave it
    dest: str  # decoded store name
    subscribed: bool  # subscribed at the source: subscribe on the store too
    role: str | None = None  # special use, if any


@dataclass(frozen=True)
class Namespace:
    prefix: str  # personal namespace prefix, e.g. "" or "INBOX."
    delimiter: str | None


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _attributes(flags: Iterable[bytes | str]) -> set[str]:
    return {(_text(f) or "").lower() for f in flags}


def _relative(name: str, ns: Namespace) -> str:
    if ns.prefix and name.lower().startswith(ns.prefix.lower()) and name.upper() != "INBOX":
        return name[len(ns.prefix):]
    return name


def _native(name: str, delimiter: str | None) -> str:
    """A preset name (written with "/") in the source's own delimiter, lower-cased."""
    return (name.replace("/", delimiter) if delimiter else name).lower()


def _in_tree(name: str, roots: Iterable[str], delimiter: str | None) -> bool:
    lowered = name.lower()
    for root in roots:
        root = _native(root, delimiter)
        if lowered == root or (delimiter and lowered.startswith(root + delimiter)):
            return True
    return False


def source_role(flags: Iterable[bytes | str], relative: str, delimiter: str | None,
                preset: Preset) -> str | None:
    """The special use of a source folder: attribute first, then preset, then common names."""
    for attribute in _attributes(flags):
        if attribute in _ATTRIBUTE_ROLES:
            return _ATTRIBUTE_ROLES[attribute]
    for name, role in preset.roles:
        if relative.lower() == _native(name, delimiter):
            return role
    top_level = delimiter is None or delimiter not in relative
    if top_level:
        for role, names in _WELL_KNOWN.items():
            if relative.lower() in names:
                return role
    return None


def store_special_folders(store_list: Iterable[ListEntry]) -> dict[str, str]:
    """Role -> store folder name, from the store's LIST attributes (first one wins)."""
    found: dict[str, str] = {}
    for flags, _delimiter, name in store_list:
        for attribute in _attributes(flags):
            role = _ATTRIBUTE_ROLES.get(attribute)
            if role and role not in found:
                found[role] = name
    return found


def translate_name(relative: str, source: Namespace, store: Namespace) -> str:
    """Re-join the hierarchy with the store's delimiter below the store's namespace prefix.

    A store delimiter occurring inside one source level would invent a level: it becomes "_".
    """
    parts = relative.split(source.delimiter) if source.delimiter else [relative]
    if store.delimiter:
        parts = [p.replace(store.delimiter, "_") for p in parts]
    return store.prefix + (store.delimiter or "/").join(parts)


def plan_folders(
    source_list: Iterable[ListEntry],
    subscribed: set[str],
    source_ns: Namespace,
    store_list: Iterable[ListEntry],
    store_ns: Namespace,
    preset_name: str = "default",
    subscribed_only: bool = False,
) -> list[FolderMapping]:
    """The folders to copy, INBOX first, each with its store name."""
    preset = PRESETS.get(preset_name, PRESETS["default"])
    specials = store_special_folders(store_list)
    plan: list[FolderMapping] = []
    for flags, _delimiter, name in source_list:
        attributes = _attributes(flags)
        is_inbox = name.upper() == "INBOX"
        if attributes & _NOT_SELECTABLE or (subscribed_only and not is_inbox
                                            and name not in subscribed):
            continue
        relative = _relative(name, source_ns)
        if attributes & preset.skip_attributes or _in_tree(relative, preset.skip,
                                                           source_ns.delimiter):
            continue
        if is_inbox:
            plan.append(FolderMapping(name, "INBOX", True))
            continue
        role = source_role(flags, relative, source_ns.delimiter, preset)
        if role is not None:
            dest = specials.get(role) or store_ns.prefix + DEFAULT_STORE_NAMES[role]
        else:
            dest = translate_name(relative, source_ns, store_ns)
        plan.append(FolderMapping(name, dest, name in subscribed, role))
    plan.sort(key=lambda m: m.dest != "INBOX")  # stable: INBOX first, the rest in LIST order
    return plan
