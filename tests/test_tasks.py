from clue_mtl.tasks import TASKS, get_task


def test_registry_facts():
    assert list(TASKS) == ["ocnli", "ocemotion", "tnews"]
    assert get_task("TNEWS").num_labels == 15 and "105" not in get_task("tnews").labels
    assert get_task("ocemotion").labels[0] == "sadness" and get_task("ocnli").labels == ("0", "1", "2")
    assert get_task("ocnli").test_file("b") == "ocnli_test_B.csv"


def test_normalisation_matches_the_organisers():
    ocnli, tnews = get_task("ocnli"), get_task("tnews")
    assert ocnli.normalize("ＡＢＣ，１２３！\u3000好") == "ABC,123! 好"  # full-width ASCII only, case kept
    assert ocnli.normalize("，。") == ",。"  # the ideographic full stop is not an ASCII form
    assert tnews.normalize("ＡＢＣ，Ｇｈｉｂｌｉ！") == "abc,ghibli!"
    assert tnews.normalize("零\u200b宽\ufeff字\u00ad符") == "零宽字符"
