"""Small raw files in the exact formats of the sources relist reads, written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_HEADER = "user,time_stamp,adgroup_id,pid,nonclk,clk"
AD_HEADER = "adgroup_id,cate_id,campaign_id,customer,brand,price"
PROFILE_HEADER = (
    "userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,occupation,"
    "new_user_class_level "
)


def write_taobao(folder: Path, seed: int, n_users: int = 60, n_ads: int = 40) -> dict:
    """Taobao Ad raw CSVs: bursts of impressions per user, some users with <= 2 records or no click."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for user in range(1, n_users + 1):
        n = int(rng.integers(1, 45))
        t = 1494000000 + int(rng.integers(0, 5000))
        no_click = rng.random() < 0.2
        for _ in range(n):
            t += int(rng.choice([0, 5, 30, 120, 280, 301, 600, 2000]))
            clk = 0 if no_click else int(rng.random() < 0.12)
            rows.append((user, t, int(rng.integers(1, n_ads + 1)), "430548_1007", 1 - clk, clk))
    order = rng.permutation(len(rows))  # the real file is not sorted
    with open(folder / "raw_sample.csv", "w") as f:
        f.write(SAMPLE_HEADER + "\n")
        for k in order:
            f.write(",".join(map(str, rows[k])) + "\n")
    with open(folder / "ad_feature.csv", "w") as f:
        f.write(AD_HEADER + "\n")
        for ad in range(1, n_ads + 1):
            brand = "NULL" if ad % 7 == 0 else str(1000 + ad % 5)
            f.write(f"{ad},{6000 + ad % 4},{80000 + ad},{ad % 9},{brand},{rng.uniform(1, 500):.2f}\n")
    with open(folder / "user_profile.csv", "w") as f:
        f.write(PROFILE_HEADER + "\n")
        for user in range(1, n_users + 1, 2):  # half the users have no profile row
            pvalue = "" if user % 3 == 0 else str(user % 3 + 1)
            f.write(f"{user},0,{user % 13},{user % 2 + 1},{user % 7},{pvalue},3,0,{user % 4 + 1}\n")
    return {"rows": [rows[k] for k in order]}


def write_prm(path: Path, seed: int, n_lists: int = 40, n_null: int = 3) -> list[dict]:
    """PRM Public lines: uid|profile|spar_ft|dens_ft1|dens_ft2|label."""
    rng = np.random.default_rng(seed)
    lists = []
    with open(path, "w") as f:
        for k in range(n_lists + n_null):
            n = int(rng.integers(3, 31))
            profile = [int(rng.integers(0, 5)), int(rng.integers(0, 3)), int(rng.integers(0, 9))]
            spar = [
                [int(rng.integers(1, 200)), int(rng.integers(1, 20)), 7, int(rng.integers(1, 4)), 2] for _ in range(n)
            ]
            d1 = [[round(float(v), 4) for v in rng.normal(size=10)] for _ in range(n)]
            d2 = [[round(float(v), 4) for v in rng.normal(size=9)] for _ in range(n)]
            label = [int(v) for v in rng.random(n) < 0.15]
            fields = [str(1000 + k), str(profile), str(spar), str(d1), str(d2), str(label)]
            if k >= n_lists:
                fields[1] = "[null, 1, 2]"
            else:
                lists.append(
                    {
                        "uid": 1000 + k,
                        "profile": profile,
                        "spar": spar,
                        "dense": [a + b for a, b in zip(d1, d2)],
                        "label": label,
                    }
                )
            f.write("|".join(fields) + "\n")
    return lists


def write_librerank(folder: Path, seed: int, sizes=(30, 40, 10)) -> dict:
    """LibRerank processed files (Ad layout: nested profile of 8 ids, 5 sparse ids and a price per item)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ft_num = 500
    written = {}
    for name, size in zip(("train", "valid", "test"), sizes):
        lines = []
        for k in range(size):
            n = int(rng.integers(2, 31))
            profile = [[int(v) for v in rng.integers(400, ft_num, size=8)]]
            spar = [[int(v) for v in rng.integers(1, 400, size=5)] for _ in range(n)]
            dens = [[float(round(rng.uniform(1, 300), 1))] for _ in range(n)]
            label = [float(v) for v in (rng.random(n) < 0.2)]
            lines.append([int(rng.integers(1, 10**6)), profile, spar, dens, label])
        (folder / f"data.{name}").write_text("".join("\t".join(str(x) for x in line) + "\n" for line in lines))
        written[name] = lines
    stat = {
        "item_num": 400,
        "cate_num": 50,
        "ft_num": ft_num,
        "profile_fnum": 8,
        "train_num": sizes[0],
        "val_num": sizes[1],
        "test_num": sizes[2],
        "itm_spar_fnum": 5,
        "itm_dens_fnum": 1,
    }
    import json

    (folder / "data.stat").write_text(json.dumps(stat))
    return written
