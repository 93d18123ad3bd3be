"""The shipped COCO / LVIS class lists (wedetect/data/texts) and the built-in names that select them.

The lists were transcribed from the official files; these checks are independent of each other so
that a transcription slip shows up: the statistics the official files are known to have, the
agreement of the separately transcribed retrieval lists with the data/texts first names (they
differ at exactly the 34 known LVIS classes), and the order of the English LVIS names against the
LVIS v1 category names (tests/fixtures/lvis_v1_category_names.txt, in category-id order).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from paths import FIXTURES
from typer.testing import CliRunner

from wedetect.cli import eval as eval_cli
from wedetect.data.classnames import builtin_class_files, class_prompts, load_class_names
from wedetect.errors import WeDetectError
from wedetect.eval.retrieval import ImageEmbeddings, save_embeddings

BUILTINS = ("coco", "coco_zh", "lvis", "lvis_zh", "retrieval_coco_zh", "retrieval_lvis_zh")


def raw(name: str) -> list[list[str]]:
    """A shipped file as stored, without going through the loader."""
    return json.loads(builtin_class_files()[name].read_text(encoding="utf-8"))


def first_names(name: str) -> list[str]:
    return [entry[0] for entry in raw(name)]


def shared_first_names(name: str) -> dict[str, int]:
    """First names used by more than one class, with how many classes use each."""
    return {n: c for n, c in Counter(first_names(name)).items() if c > 1}


# ------------------------------------------------------------------------------------ the files


def test_builtin_names_and_files() -> None:
    files = builtin_class_files()
    assert tuple(files) == BUILTINS
    assert all(path.is_file() and path.parent.name == "texts" for path in files.values())


@pytest.mark.parametrize("name", BUILTINS)
def test_official_format(name: str) -> None:
    """JSON list of non-empty name lists, UTF-8 with the characters written out, loader-neutral."""
    text = builtin_class_files()[name].read_text(encoding="utf-8")
    assert "\\u" not in text  # ensure_ascii=False, as the official files
    data = json.loads(text)
    assert isinstance(data, list)
    for entry in data:
        assert isinstance(entry, list) and entry
        assert all(isinstance(n, str) and n and n == n.strip() for n in entry)
        assert len(set(entry)) == len(entry)  # no synonym repeated within a class
    assert load_class_names(name) == data


# name: (classes, entries with > 1 string, max strings, classes sharing their first string, distinct shared)
STATS = {
    "coco": (80, 0, 1, 0, 0),
    "coco_zh": (80, 0, 1, 2, 1),
    "lvis": (1203, 463, 10, 10, 5),
    "lvis_zh": (1203, 491, 8, 110, 52),
    "retrieval_coco_zh": (80, 0, 1, 2, 1),
    "retrieval_lvis_zh": (1203, 0, 1, 109, 51),
}


@pytest.mark.parametrize("name", BUILTINS)
def test_statistics_of_the_official_lists(name: str) -> None:
    data = raw(name)
    shared = shared_first_names(name)
    got = (len(data), sum(len(e) > 1 for e in data), max(map(len, data)), sum(shared.values()), len(shared))
    assert got == STATS[name]


# Characters in the official files (these three are stored byte for byte as published).
OFFICIAL_LENGTHS = {"coco": 1022, "lvis": 28169, "lvis_zh": 14127}


@pytest.mark.parametrize("name", OFFICIAL_LENGTHS)
def test_same_length_as_the_official_file(name: str) -> None:
    """Catches a dropped or added synonym that the statistics above would miss."""
    assert len(builtin_class_files()[name].read_text(encoding="utf-8")) == OFFICIAL_LENGTHS[name]


def test_shared_first_names() -> None:
    assert shared_first_names("lvis") == {"bow": 2, "fish": 2, "octopus": 2, "pan": 2, "salmon": 2}
    coco_en, coco_zh = first_names("coco"), first_names("coco_zh")
    assert shared_first_names("coco_zh") == {"滑雪板": 2}
    assert coco_en[30:32] == ["skis", "snowboard"] and coco_zh[30:32] == ["滑雪板", "滑雪板"]


def test_coco_lists_are_aligned() -> None:
    en, zh = first_names("coco"), first_names("coco_zh")
    assert (en[0], en[-2], en[-1]) == ("person", "hair drier", "toothbrush")
    assert all("_" not in n for n in en)
    pairs = {0: ("person", "人"), 13: ("bench", "长凳"), 62: ("tv", "电视显示器"), 77: ("teddy bear", "泰迪熊小熊")}
    assert {i: (en[i], zh[i]) for i in pairs} == pairs


def test_lvis_lists_are_aligned() -> None:
    en, zh = raw("lvis"), raw("lvis_zh")
    pairs = {0: ("aerosol can", "喷雾罐"), 792: ("person", "人"), 1202: ("zucchini", "西葫芦")}
    assert {i: (en[i][0], zh[i][0]) for i in pairs} == pairs
    assert len(en[792]) == len(zh[792]) == 8  # person, baby, child, ... in both languages


# ---------------------------------------------------------------- retrieval lists vs data/texts

# idx: (LVIS category, hard-coded retrieval name, lvis_v1_zh first name)
RETRIEVAL_LVIS_DIFFERENCES = {
    161: ("bull", "公牛", "母牛"),
    240: ("chicken_(animal)", "鸡肉", "鸡"),
    264: ("cleat_(for_securing_rope)", "防滑钉", "系缆墩"),
    398: ("drum_(musical_instrument)", "鼓状物", "鼓"),
    438: ("file_(tool)", "文件夹", "文件"),
    447: ("fish_(food)", "鱼饲料", "鱼"),
    458: ("flip-flop_(sandal)", "夹趾拖鞋", "人字拖"),
    505: ("gondola_(boat)", "小船", "贡多拉"),
    623: ("lamb_(animal)", "小羊", "羔羊"),
    654: ("speaker_(stereo_equipment)", "音箱", "扬声器"),
    739: ("overalls_(clothing)", "工装裤", "工作服"),
    751: ("pan_(metal_container)", "锅", "金属容器"),
    761: ("parasail_(sports)", "滑翔伞运动", "帆伞"),
    771: ("patty_(food)", "小馅饼", "肉饼"),
    776: ("peeler_(tool_for_fruit_and_vegetables)", "果蔬削皮工具", "削皮器"),
    882: ("rib_(food)", "排骨", "肋骨"),
    898: ("saddle_(on_an_animal)", "鞍座", "马鞍"),
    906: ("salmon_(fish)", "鲑鱼", "三文鱼"),
    907: ("salmon_(food)", "鲑鱼肉", "三文鱼肉"),
    918: ("scale_(measuring_instrument)", "天平", "秤"),
    957: ("shredder_(for_paper)", "切碎机", "碎纸机"),
    971: ("sling_(bandage)", "悬带", "吊带"),
    991: ("sparkler_(fireworks)", "烟火", "烟花棒"),
    1007: ("statue_(sculpture)", "雕塑", "雕像"),
    1008: ("steak_(food)", "肉排", "牛排"),
    1013: ("stereo_(sound_system)", "立体声音响系统", "立体声"),
    1032: ("suit_(clothing)", "西装", "套装"),
    1059: ("tank_top_(clothing)", "吊带背心", "背心"),
    1060: ("tape_(sticky_cloth_or_paper)", "磁带", "胶带"),
    1093: ("toast_(food)", "烤面包片", "吐司"),
    1127: ("turkey_(food)", "火鸡肉", "火鸡"),
    1184: ("window_box_(for_plants)", "花盆箱", "窗台花箱"),
    1190: ("blinder_(for_horses)", "眼罩", "马眼罩"),
    1200: ("yoke_(animal_equipment)", "轭", "牛轭"),
}


def lvis_category_names() -> list[str]:
    return (FIXTURES / "lvis_v1_category_names.txt").read_text(encoding="utf-8").splitlines()


def test_retrieval_lvis_list_differs_from_data_texts_at_exactly_34_classes() -> None:
    hard_coded, official = first_names("retrieval_lvis_zh"), raw("lvis_zh")
    categories = lvis_category_names()
    differences = {
        i: (categories[i], h, o[0]) for i, (h, o) in enumerate(zip(hard_coded, official, strict=True)) if h != o[0]
    }
    assert differences == RETRIEVAL_LVIS_DIFFERENCES
    # Everywhere but 'bull' the hard-coded name is one of that class's other synonyms.
    assert [i for i in differences if hard_coded[i] not in official[i][1:]] == [161]


def test_retrieval_coco_list_equals_coco_zh() -> None:
    assert raw("retrieval_coco_zh") == raw("coco_zh")


# ------------------------------------------------------------------------ English LVIS vs LVIS v1


def plain(category: str) -> str:
    """LVIS category name -> the first name the English class file uses: '_' -> ' ', no '(qualifier)'."""
    return re.sub(r"_\(.*?\)", "", category).replace("_", " ")


# Classes whose English first name is not plain(category): the file says 'horned cow' for 'bull',
# and LVIS v1 spells one category with a stray second word.
ENGLISH_EXCEPTIONS = {
    161: ("bull", "horned cow"),
    697: ("monitor_(computer_equipment) computer_monitor", "monitor"),
}


def test_english_lvis_follows_lvis_v1_category_order() -> None:
    categories, english = lvis_category_names(), raw("lvis")
    assert len(categories) == len(set(categories)) == len(english) == 1203
    exceptions = {i: (c, e[0]) for i, (c, e) in enumerate(zip(categories, english, strict=True)) if plain(c) != e[0]}
    assert exceptions == ENGLISH_EXCEPTIONS
    # A qualified category also lists 'name qualifier' among its synonyms, e.g. 'bat animal'.
    qualified = [i for i, c in enumerate(categories) if "(" in c]
    assert len(qualified) == 108
    missing = [i for i in qualified if re.sub(r"[()]", "", categories[i]).replace("_", " ") not in english[i]]
    assert missing == [697]


# ----------------------------------------------------------------------------------- resolution


def test_builtin_names_resolve_wherever_a_class_file_is_accepted() -> None:
    assert class_prompts(classes_file="retrieval_lvis_zh") == first_names("retrieval_lvis_zh")
    assert class_prompts(classes_file=Path("coco")) == first_names("coco")
    assert load_class_names("lvis_zh")[792][:2] == ["人", "婴儿"]


def test_an_existing_file_wins_over_a_builtin_name(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("coco_zh").write_text("猫\n狗\n", encoding="utf-8")
    assert load_class_names("coco_zh") == [["猫"], ["狗"]]
    assert class_prompts(classes_file="coco_zh") == ["猫", "狗"]
    assert len(load_class_names("lvis_zh")) == 1203  # other names still resolve


def test_unknown_name_lists_the_builtins(tmp_path) -> None:
    with pytest.raises(WeDetectError, match="not found") as error:
        load_class_names(tmp_path / "coco_zh_typo")
    assert all(name in str(error.value) for name in BUILTINS)
    with pytest.raises(WeDetectError, match="retrieval_lvis_zh"):
        class_prompts(classes_file="lvis_v2")


# ------------------------------------------------------------------------- retrieval CLI default


def test_retrieval_default_names_follow_mode(tmp_path) -> None:
    names, source = eval_cli._retrieval_class_names(None, "coco")
    assert (names, source) == (first_names("coco_zh"), "retrieval_coco_zh")
    names, source = eval_cli._retrieval_class_names(None, "lvis")
    assert source == "retrieval_lvis_zh" and len(names) == 1203
    assert names[161] == "公牛" and first_names("lvis_zh")[161] == "母牛"  # not the data/texts list
    own = tmp_path / "names.txt"
    own.write_text("猫\n狗\n", encoding="utf-8")
    assert eval_cli._retrieval_class_names(own, "lvis") == (["猫", "狗"], str(own))
    assert eval_cli._retrieval_class_names(Path("lvis_zh"), "lvis")[0] == first_names("lvis_zh")


class RecordingEncoder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode_text(self, names):
        self.calls.append(list(names))
        return torch.ones(len(names), 4)


@pytest.fixture
def coco_like(tmp_path, monkeypatch) -> dict:
    """An 80-category dataset, saved image embeddings without text, and a recording text encoder."""
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(first_names("coco"))]
    ann = {
        "images": [{"id": 1, "file_name": "1.jpg", "height": 10, "width": 10}],
        "categories": categories,
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    image = ImageEmbeddings(image_id=1, embedding=torch.ones(2, 4), scale=torch.zeros(2), bias=torch.zeros(2))
    save_embeddings(tmp_path / "emb.npz", [image])
    encoder = RecordingEncoder()
    monkeypatch.setattr(eval_cli, "_load_detector", lambda *args, **kw: encoder)
    return {"root": tmp_path, "encoder": encoder}


def retrieval_args(root: Path, *extra) -> list[str]:
    args = ["retrieval", "--dataset", root / "ann.json", "--embeddings", root / "emb.npz", "--checkpoint",
            root / "det.pth", "--output-dir", root / "out", "--json", "-", *extra]  # fmt: skip
    return [str(a) for a in args]


def test_retrieval_cli_embeds_the_official_list_by_default(coco_like) -> None:
    result = CliRunner().invoke(eval_cli.app, retrieval_args(coco_like["root"]))
    assert result.exit_code == 0, result.output
    assert coco_like["encoder"].calls == [first_names("retrieval_coco_zh")]  # one chunk of 80


def test_retrieval_cli_default_for_lvis_mode_is_the_lvis_list(coco_like) -> None:
    result = CliRunner().invoke(eval_cli.app, retrieval_args(coco_like["root"], "--mode", "lvis"))
    assert result.exit_code == 2
    assert "class file retrieval_lvis_zh has 1203 classes but the dataset has 80" in result.output
    assert coco_like["encoder"].calls == []
