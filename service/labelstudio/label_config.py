"""What the backend needs from a Label Studio labeling config: which task data key holds the
image, and which tag its masks go to: a ``BrushLabels`` tag (brush masks) or a
``PolygonLabels`` tag (polygons traced from the masks). With both, polygons when the
``PolygonLabels`` tag is marked ``smart="true"``, brushes otherwise.

A config is XML written by the project's owner, e.g.::

    <View>
      <Image name="image" value="$image"/>
      <BrushLabels name="mask" toName="image"><Label value="polyp"/></BrushLabels>
      <KeyPointLabels name="click" toName="image" smart="true">...</KeyPointLabels>
    </View>

It is parsed with the standard library after refusing document type declarations (no
entities, so no entity expansion) and anything longer than :data:`MAX_CONFIG_CHARS`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal

from service.labelstudio.errors import InvalidLabelConfigError

__all__ = ["MAX_CONFIG_CHARS", "LabelConfig", "parse_label_config"]

MAX_CONFIG_CHARS = 256 * 1024


@dataclass(frozen=True)
class LabelConfig:
    """image_key: the task data key of the image (``image`` for ``value="$image"``);
    to_name: the Image tag's name; from_name: the name of the tag masks go to; labels: its
    label values, in order; output: ``brush`` (BrushLabels) or ``polygon`` (PolygonLabels)."""

    image_key: str
    to_name: str
    from_name: str
    labels: tuple[str, ...]
    output: Literal["brush", "polygon"] = "brush"


def _tag(element: ET.Element) -> str:
    return element.tag.lower() if isinstance(element.tag, str) else ""


def parse_label_config(text: object) -> LabelConfig:
    """The tag masks go to (see the module doc) and the ``Image`` it labels;
    InvalidLabelConfigError when there is none or the XML is refused."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidLabelConfigError("label_config (the project's labeling config) is "
                                      "required")
    if len(text) > MAX_CONFIG_CHARS:
        raise InvalidLabelConfigError(f"label_config is longer than {MAX_CONFIG_CHARS} "
                                      "characters")
    if "<!" in text.replace("<!--", ""):
        raise InvalidLabelConfigError("label_config must not hold document type or entity "
                                      "declarations")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise InvalidLabelConfigError(f"label_config is not well-formed XML: {exc}") from None
    brushes = [e for e in root.iter() if _tag(e) == "brushlabels"]
    polygons = [e for e in root.iter() if _tag(e) == "polygonlabels"]
    if not brushes and not polygons:
        raise InvalidLabelConfigError("label_config has no BrushLabels or PolygonLabels tag: "
                                      "regcl answers with brush masks or polygons")
    smart = [e for e in polygons if (e.get("smart") or "").lower() == "true"]
    output: Literal["brush", "polygon"] = "polygon" if polygons and (smart or not brushes) \
        else "brush"
    tag = (smart or polygons)[0] if output == "polygon" else brushes[0]
    kind = "PolygonLabels" if output == "polygon" else "BrushLabels"
    from_name, to_name = tag.get("name"), tag.get("toName")
    if not from_name or not to_name:
        raise InvalidLabelConfigError(f"the {kind} tag needs name and toName")
    images = [e for e in root.iter() if _tag(e) == "image" and e.get("name") == to_name]
    value = images[0].get("value", "") if images else ""
    if not value.startswith("$") or len(value) < 2:
        raise InvalidLabelConfigError(f"no Image tag named {to_name!r} with value=\"$key\" "
                                      f"(the {kind}' toName)")
    labels = tuple(e.get("value", "") for e in tag if _tag(e) == "label" and e.get("value"))
    return LabelConfig(value[1:], to_name, from_name, labels, output)
