"""The page's start form as the server renders it (GET /), read with the
standard library's HTML parser: what a test in this process can check of
the form without a browser."""
from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser


@dataclass
class Choice:
    """A select of the form (``kind``: "strategy", "aggregator") and the
    fieldsets of each option's own settings."""

    options: list[dict[str, str | None]] = field(default_factory=list)  # value, data-summary, title, selected
    summary: str = ""  # the line under the select
    settings: dict[str, dict[str, str]] = field(default_factory=dict)  # option → {input name: its value}
    disabled: set[str] = field(default_factory=set)  # options whose fieldset starts disabled


def form_choice(html: str, kind: str) -> Choice:
    """The select ``#f-<kind>``, its ``#<kind>-summary`` line and its
    ``fieldset[data-<kind>]`` settings, from the page's HTML."""
    choice = Choice()

    class Reader(HTMLParser):
        in_select = in_summary = False
        fieldset: str | None = None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "select" and a.get("id") == f"f-{kind}":
                self.in_select = True
            elif tag == "option" and self.in_select:
                choice.options.append({"value": a["value"], "summary": a.get("data-summary"),
                                       "title": a.get("title"), "selected": "selected" in a})
            elif tag == "small" and a.get("id") == f"{kind}-summary":
                self.in_summary = True
            elif tag == "fieldset" and f"data-{kind}" in a:
                self.fieldset = a[f"data-{kind}"]
                choice.settings[self.fieldset] = {}
                if "disabled" in a:
                    choice.disabled.add(self.fieldset)
            elif tag == "input" and self.fieldset is not None:
                choice.settings[self.fieldset][a["name"]] = a.get("value", "")

        def handle_endtag(self, tag):
            if tag == "select":
                self.in_select = False
            elif tag == "small":
                self.in_summary = False
            elif tag == "fieldset":
                self.fieldset = None

        def handle_data(self, data):
            if self.in_summary:
                choice.summary += data

    Reader(convert_charrefs=True).feed(html)
    return choice
