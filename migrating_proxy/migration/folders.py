"""Which source folders to copy and what they are called on the store.

Pure functions over LIST results (imapclient's `(flags, delimiter, name)` triples with names
already decoded from modified UTF-7), so the rules are testable without a server:

* `\\Noselect` / `\\NonExistent` folders are not copied (their selectable children are).
* Special-use folders go to the store's folder with the same special use, whatever either side
  calls it. A folder's use comes from its attribute (RFC 6154, XLIST); a guess from its name
  (the provider preset's names, then well-known ones such as "Sent Items" or "Entwürfe") is
  made only for a use that no source folder has by attribute, and for one folder per use.
* Provider presets skip folders that are not mail (Exchange calendars...) or would copy a
  message once per label (Gmail's All Mail, Important, Starred).
* Every other folder keeps its name and hierarchy, re-joined with the store's delimiter below
  its namespace.
* No two source folders ever share a store folder: a folder whose store name is already taken
  (by a special folder, or by another folder after delimiter translation) gets " (2)", " (3)"...
  and its subfolders follow it. A user's "Entwürfe" beside a "Drafts" stays a folder of its own.
* Parents come before their children in the plan, whatever order LIST gave: creating a child
  first leaves its parent as a `\\Noselect` placeholder on some stores (Dovecot).
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


def attribute_role(flags: Iterable[bytes | str]) -> str | None:
    """The special use a source folder declares by attribute (RFC 6154 or XLIST), if any."""
    for attribute in sorted(_attributes(flags)):
        if attribute in _ATTRIBUTE_ROLES:
            return _ATTRIBUTE_ROLES[attribute]
    return None


def name_role(relative: str, delimiter: str | None, preset: Preset) -> tuple[str, int] | None:
    """The special use a folder's name suggests, with a rank (lower is a better guess): the
    preset's own names first, then well-known top-level names in the order listed."""
    for name, role in preset.roles:
        if relative.lower() == _native(name, delimiter):
            return role, 0
    if delimiter is None or delimiter not in relative:
        for role, names in _WELL_KNOWN.items():
            if relative.lower() in names:
                return role, 1 + names.index(relative.lower())
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


@dataclass(frozen=True)
class _Candidate:
    """A source folder that will be copied, before its store name is chosen."""

    name: str
    relative: str  # below the source's personal namespace
    flags: tuple[bytes | str, ...]
    subscribed: bool


def assign_roles(folders: Sequence[_Candidate], delimiter: str | None,
                 preset: Preset) -> dict[str, str]:
    """Source name -> special use, one folder per use.

    An attribute is the server's word and wins; of several folders with one attribute the
    first listed has it. A name is a guess, made only for a use no folder has by attribute,
    and given to the best-ranked name only ("Sent" over "Sent Items", then LIST order).
    """
    roles: dict[str, str] = {}
    by_attribute: set[str] = set()
    for folder in folders:
        role = attribute_role(folder.flags)
        if role is not None and role not in by_attribute:
            by_attribute.add(role)
            roles[folder.name] = role
    guesses: dict[str, tuple[int, int, str]] = {}  # role -> (rank, LIST position, name)
    for position, folder in enumerate(folders):
        if attribute_role(folder.flags) is not None:
            continue  # its use was declared (or lost to an earlier folder): no guessing
        guess = name_role(folder.relative, delimiter, preset)
        if guess is None or guess[0] in by_attribute:
            continue
        role, rank = guess
        if role not in guesses or (rank, position) < guesses[role][:2]:
            guesses[role] = (rank, position, folder.name)
    roles.update({name: role for role, (_rank, _position, name) in guesses.items()})
    return roles


def _store_key(name: str, delimiter: str | None) -> str:
    """Store names compared as the store compares them: INBOX in any letter case is INBOX."""
    first, sep, rest = name.partition(delimiter) if delimiter else (name, "", "")
    return ("INBOX" if first.upper() == "INBOX" else first) + sep + rest


class _StoreNames:
    """Store names handed out so far: no two source folders get the same one."""

    def __init__(self, store: Namespace) -> None:
        self.store = store
        self.taken: set[str] = set()
        self.moved: dict[str, str] = {}  # source relative name -> store name, when suffixed

    def claim(self, name: str) -> None:
        self.taken.add(_store_key(name, self.store.delimiter))

    def own_name(self, relative: str, source: Namespace) -> str:
        """relative's store name below any moved parent, suffixed if taken, and claimed."""
        name = self._below_moved_parent(relative, source)
        candidate, number = name, 1
        while _store_key(candidate, self.store.delimiter) in self.taken:
            number += 1
            candidate = f"{name} ({number})"
        if candidate != name:
            self.moved[relative] = candidate
        self.claim(candidate)
        return candidate

    def _below_moved_parent(self, relative: str, source: Namespace) -> str:
        parts = relative.split(source.delimiter) if source.delimiter else [relative]
        for depth in range(len(parts) - 1, 0, -1):
            parent = (source.delimiter or "").join(parts[:depth])
            if parent in self.moved:
                rest = translate_name((source.delimiter or "").join(parts[depth:]), source,
                                      Namespace("", self.store.delimiter))
                return self.moved[parent] + (self.store.delimiter or "/") + rest
        return translate_name(relative, source, self.store)


def _depth(name: str, delimiter: str | None) -> int:
    return name.count(delimiter) if delimiter else 0


def parents_first(plan: list[FolderMapping], delimiter: str | None) -> list[FolderMapping]:
    """The plan with every folder after the plan's folders above it on the store, otherwise in
    the order given: creating a child first would leave the parent a placeholder."""
    by_dest = {m.dest: m for m in plan}
    ordered: list[FolderMapping] = []
    placed: set[str] = set()

    def place(mapping: FolderMapping) -> None:
        if mapping.dest in placed:
            return
        placed.add(mapping.dest)
        if delimiter:
            parts = mapping.dest.split(delimiter)
            for depth in range(1, len(parts)):
                parent = by_dest.get(delimiter.join(parts[:depth]))
                if parent is not None:
                    place(parent)
        ordered.append(mapping)

    for mapping in plan:
        place(mapping)
    return ordered


def plan_folders(
    source_list: Iterable[ListEntry],
    subscribed: set[str],
    source_ns: Namespace,
    store_list: Iterable[ListEntry],
    store_ns: Namespace,
    preset_name: str = "default",
    subscribed_only: bool = False,
) -> list[FolderMapping]:
    """The folders to copy, INBOX first and parents before children, each with its own store
    name (never one another source folder also goes to)."""
    preset = PRESETS.get(preset_name, PRESETS["default"])
    specials = store_special_folders(store_list)
    folders: list[_Candidate] = []
    inbox: str | None = None  # as the source spells it
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
            inbox = name
            continue
        folders.append(_Candidate(name, relative, tuple(flags), name in subscribed))

    roles = assign_roles(folders, source_ns.delimiter, preset)
    names = _StoreNames(store_ns)
    names.claim("INBOX")
    dests: dict[str, str] = {}
    for folder in folders:  # the special folders first: the store's own ones are theirs
        role = roles.get(folder.name)
        if role is not None:
            dests[folder.name] = specials.get(role) or store_ns.prefix + DEFAULT_STORE_NAMES[role]
            names.claim(dests[folder.name])
    for folder in sorted(folders, key=lambda f: _depth(f.relative, source_ns.delimiter)):
        if folder.name not in dests:  # parents before children, so children follow a move
            dests[folder.name] = names.own_name(folder.relative, source_ns)

    plan = [FolderMapping(inbox, "INBOX", True)] if inbox is not None else []
    plan += [FolderMapping(f.name, dests[f.name], f.subscribed, roles.get(f.name))
             for f in folders]
    return parents_first(plan, store_ns.delimiter)
