"""Builds datas/image_call_train.jsonl and datas/image_call_test.jsonl.

Every fragment below was written for this project, per language (Traditional
Chinese first, Simplified Chinese, English, mixed Chinese/English, Discord
style); nothing is machine-translated. Rows are sampled from request shapes x
subjects x styles with a fixed seed, so the files are reproducible:

    python3 datas/make_dataset.py

Honest evaluation: about a fifth of the request shapes of every category are
held out for the test file only, so the test measures phrasings the model
never saw in training, not memorised templates. No user text repeats within
or across the files (tests/dataset.rs checks it).

Labelling rules (from the original seed rows): a request to create OR edit an
image with some content is a call whose prompt keeps the subject and style the
user asked for, in the user's language; questions about images, art advice,
"generate a list/script/plan", "draw a conclusion", idioms with 畫, and a bare
"make me a picture" without content are chat (the answer asks what to draw).
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20261129
CALL = 'call("generate_image", {{"prompt": {}}})'


def call(prompt):
    return CALL.format(json.dumps(prompt, ensure_ascii=False))


# ---------------------------------------------------------------- subjects
# (Traditional, Simplified, English)
SUBJECTS = [
    ("一隻在月光下彈吉他的狐狸", "一只在月光下弹吉他的狐狸", "a fox playing guitar under the moonlight"),
    ("睡在金幣堆上的龍", "睡在金币堆上的龙", "a dragon sleeping on a pile of gold coins"),
    ("可愛柴犬在櫻花樹下", "可爱柴犬在樱花树下", "a cute shiba inu under a cherry blossom tree"),
    ("下雨天的台北街頭", "下雨天的上海街头", "a rainy street in Taipei at night"),
    ("戴墨鏡的橘貓", "戴墨镜的橘猫", "an orange cat wearing sunglasses"),
    ("太空站裡喝咖啡的太空人", "太空站里喝咖啡的宇航员", "an astronaut drinking coffee in a space station"),
    ("海邊的燈塔和夕陽", "海边的灯塔和夕阳", "a lighthouse by the sea at sunset"),
    ("蒸汽龐克風的城市", "蒸汽朋克风的城市", "a steampunk city skyline"),
    ("森林裡發光的蘑菇", "森林里发光的蘑菇", "glowing mushrooms in a dark forest"),
    ("騎腳踏車的企鵝", "骑自行车的企鹅", "a penguin riding a bicycle"),
    ("夜市裡的珍珠奶茶攤", "夜市里的奶茶摊", "a bubble tea stall at a night market"),
    ("漂浮在雲上的城堡", "漂浮在云上的城堡", "a castle floating above the clouds"),
    ("在圖書館看書的貓頭鷹", "在图书馆看书的猫头鹰", "an owl reading in a library"),
    ("穿太空衣的倉鼠", "穿太空服的仓鼠", "a hamster in a tiny space suit"),
    ("雪地裡的紅色小木屋", "雪地里的红色小木屋", "a red cabin in the snow"),
    ("賽博龐克風格的機車騎士", "赛博朋克风格的摩托车手", "a cyberpunk motorcycle rider"),
    ("一碗熱騰騰的牛肉麵", "一碗热腾腾的牛肉面", "a steaming bowl of beef noodle soup"),
    ("在廟裡拜拜的學生", "在庙里拜拜的学生", "students praying at a temple"),
    ("拿著書的高中生", "拿着书的高中生", "a high school student holding a book"),
    ("四季交替的山巒", "四季交替的山峦", "mountains changing through the four seasons"),
    ("手繪風格的生日蛋糕", "手绘风格的生日蛋糕", "a hand-drawn birthday cake"),
    ("草地上玩耍的卡通貓咪", "草地上玩耍的卡通猫咪", "cartoon kittens playing on the grass"),
    ("未來科幻城市夜景", "未来科幻城市夜景", "a futuristic city at night"),
    ("森林中覆滿白雪的雪景", "森林中覆满白雪的雪景", "a snow-covered forest"),
    ("水母在深海發光", "水母在深海发光", "jellyfish glowing in the deep sea"),
    ("一艘在星空下航行的帆船", "一艘在星空下航行的帆船", "a sailboat under a starry sky"),
    ("會飛的鯨魚", "会飞的鲸鱼", "a whale flying through the sky"),
    ("坐在窗邊看雨的女孩", "坐在窗边看雨的女孩", "a girl watching the rain by the window"),
    ("穿和服的狐狸少女", "穿和服的狐狸少女", "a fox girl in a kimono"),
    ("機器人在花園裡澆花", "机器人在花园里浇花", "a robot watering flowers in a garden"),
    ("古代中國的宮殿", "古代中国的宫殿", "an ancient Chinese palace"),
    ("日落時的沙漠駱駝隊", "日落时的沙漠骆驼队", "a camel caravan in the desert at sunset"),
    ("熊貓在竹林裡吃竹子", "熊猫在竹林里吃竹子", "a panda eating bamboo in a bamboo forest"),
    ("下雪的京都寺廟", "下雪的京都寺庙", "a temple in Kyoto covered in snow"),
    ("咖啡廳裡打瞌睡的黑貓", "咖啡馆里打瞌睡的黑猫", "a black cat napping in a cafe"),
    ("彩虹下的獨角獸", "彩虹下的独角兽", "a unicorn under a rainbow"),
    ("火山爆發的夜晚", "火山喷发的夜晚", "a volcano erupting at night"),
    ("城市屋頂上的流星雨", "城市屋顶上的流星雨", "a meteor shower over city rooftops"),
    ("抱著枕頭的小熊", "抱着枕头的小熊", "a little bear hugging a pillow"),
    ("中秋節賞月的一家人", "中秋节赏月的一家人", "a family watching the moon at Mid-Autumn Festival"),
    ("巨大的章魚攻擊海盜船", "巨大的章鱼攻击海盗船", "a giant octopus attacking a pirate ship"),
    ("霓虹燈下的拉麵店", "霓虹灯下的拉面店", "a ramen shop under neon lights"),
    ("秋天落葉的公園長椅", "秋天落叶的公园长椅", "a park bench with autumn leaves"),
    ("玩電動的柯基", "玩电子游戏的柯基", "a corgi playing video games"),
    ("水彩風格的台灣黑熊", "水彩风格的台湾黑熊", "a Formosan black bear in watercolor"),
    ("鐵道旁的向日葵花田", "铁道旁的向日葵花田", "a sunflower field next to a railway"),
    ("穿西裝的青蛙", "穿西装的青蛙", "a frog wearing a suit"),
    ("神秘的魔法書房", "神秘的魔法书房", "a mysterious wizard's study"),
    ("一杯拉花拿鐵", "一杯拉花拿铁", "a latte with latte art"),
    ("躲在紙箱裡的小貓", "躲在纸箱里的小猫", "a kitten hiding in a cardboard box"),
    ("雨林裡的瀑布", "雨林里的瀑布", "a waterfall in the rainforest"),
    ("月球上的兔子", "月球上的兔子", "a rabbit on the moon"),
    ("夏天的海灘派對", "夏天的海滩派对", "a summer beach party"),
    ("戴皇冠的鬥魚", "戴皇冠的斗鱼", "a betta fish wearing a crown"),
    ("老街上的腳踏車", "老街上的自行车", "a bicycle on an old street"),
    ("一座被藤蔓覆蓋的廢墟", "一座被藤蔓覆盖的废墟", "ruins covered in vines"),
    ("滑雪的北極熊", "滑雪的北极熊", "a polar bear skiing"),
    ("開滿繡球花的小巷", "开满绣球花的小巷", "an alley full of hydrangeas"),
    ("宇宙中的黑洞", "宇宙中的黑洞", "a black hole in space"),
    ("正在做甜點的機器人廚師", "正在做甜点的机器人厨师", "a robot chef making desserts"),
    ("我的頭像，一隻戴耳機的兔子", "我的头像，一只戴耳机的兔子", "my avatar: a rabbit wearing headphones"),
    ("伺服器的橫幅，主題是星空和鯨魚", "服务器的横幅，主题是星空和鲸鱼", "a server banner with stars and whales"),
    ("Discord 表情符號，一隻生氣的鴨子", "Discord 表情，一只生气的鸭子", "a Discord emoji of an angry duck"),
    ("跑團用的精靈弓箭手角色", "跑团用的精灵弓箭手角色", "an elf archer character for our D&D campaign"),
    ("遊戲裡的寶箱圖示", "游戏里的宝箱图标", "a treasure chest icon for a game"),
    ("咖啡店的 logo，有貓和咖啡豆", "咖啡店的 logo，有猫和咖啡豆", "a coffee shop logo with a cat and coffee beans"),
    ("一張生日賀卡，上面有氣球", "一张生日贺卡，上面有气球", "a birthday card with balloons"),
    ("阿里山的日出", "黄山的日出", "sunrise over the mountains"),
    ("九份的夜景", "西湖的夜景", "a night view of an old mountain town"),
    ("101 大樓放煙火", "外滩放烟火", "fireworks over a skyscraper"),
]

STYLES = [
    ("水彩", "水彩", "watercolor"),
    ("吉卜力風格", "吉卜力风格", "Studio Ghibli style"),
    ("賽博龐克", "赛博朋克", "cyberpunk"),
    ("像素風", "像素风", "pixel art"),
    ("油畫", "油画", "oil painting"),
    ("黑白線稿", "黑白线稿", "black and white line art"),
    ("寫實照片", "写实照片", "photorealistic"),
    ("日系動漫風", "日系动漫风", "anime style"),
    ("3D 渲染", "3D 渲染", "3D render"),
    ("復古海報風", "复古海报风", "retro poster style"),
    ("浮世繪風格", "浮世绘风格", "ukiyo-e style"),
    ("低多邊形", "低多边形", "low poly"),
    ("蠟筆畫", "蜡笔画", "crayon drawing"),
    ("霓虹燈風格", "霓虹灯风格", "neon style"),
    ("極簡扁平插畫", "极简扁平插画", "minimalist flat illustration"),
    ("暗黑奇幻", "暗黑奇幻", "dark fantasy"),
    ("Q 版可愛風", "Q 版可爱风", "chibi style"),
    ("國畫水墨", "国画水墨", "Chinese ink painting"),
    ("蒸汽波", "蒸汽波", "vaporwave"),
    ("粉彩柔和色調", "粉彩柔和色调", "soft pastel colors"),
]

EXTRAS = [
    ("16:9 構圖", "16:9 构图", "16:9"),
    ("直式手機桌布", "竖版手机壁纸", "phone wallpaper, vertical"),
    ("高解析度", "高清", "high resolution"),
    ("正方形", "正方形", "square"),
    ("溫暖的色調", "暖色调", "warm colors"),
    ("電影感光影", "电影感光影", "cinematic lighting"),
]

# ---------------------------------------------------------------- create requests
# {s}=subject {st}=style {x}=extra; each entry: (template, prompt template)
CREATE = {
    "zh-TW": [
        ("幫我畫{s}", "{s}"),
        ("可以幫我畫{s}嗎？", "{s}"),
        ("請生成一張{st}的{s}", "{st}的{s}"),
        ("我想要一張{s}的圖片，{st}", "{s}，{st}"),
        ("來一張{s}，{st}風", "{s}，{st}"),
        ("給我一幅{s}，要{st}", "{s}，{st}"),
        ("畫個{s}給我看看", "{s}"),
        ("請產生{s}的插畫，{x}", "{s}插畫，{x}"),
        ("幫我生成一張「{s}」，{st}，{x}", "{s}，{st}，{x}"),
        ("能不能做一張{s}的圖？", "{s}"),
        ("我需要一張{st}的{s}當簡報封面", "{st}的{s}，簡報封面"),
        ("畫一下{s}好嗎", "{s}"),
        ("幫忙出個圖：{s}", "{s}"),
        ("想看{st}的{s}，可以畫嗎", "{st}的{s}"),
        ("請用{st}畫{s}", "{st}的{s}"),
        ("做一張{s}的圖給我，{x}", "{s}，{x}"),
        ("生成{s}的圖片", "{s}"),
        ("今天想要一張{s}的圖", "{s}"),
        ("拜託畫{s}，{st}的那種", "{s}，{st}"),
        ("請幫我繪製{s}", "{s}"),
        ("可以給我一張{s}嗎？{x}", "{s}，{x}"),
        ("我想要{st}的{s}，麻煩了", "{st}的{s}"),
        ("嗨！幫我畫{s}好不好", "{s}"),
        ("畫一張{s}，風格{st}", "{s}，{st}"),
        ("幫我產一張{s}", "{s}"),
        ("來點圖：{s}，{st}", "{s}，{st}"),
        ("能生一張{s}的照片嗎", "{s}的照片"),
        ("我要一張{s}，{x}，{st}", "{s}，{x}，{st}"),
    ],
    "zh-CN": [
        ("帮我画{s}", "{s}"),
        ("可以帮我画一张{s}吗？", "{s}"),
        ("请生成一张{st}的{s}", "{st}的{s}"),
        ("我想要一张{s}的图，{st}", "{s}，{st}"),
        ("来一张{s}，{st}", "{s}，{st}"),
        ("整一张{s}的图呗", "{s}"),
        ("给我画个{s}", "{s}"),
        ("帮我生成{s}的插画，{x}", "{s}插画，{x}"),
        ("能不能出一张{st}的{s}", "{st}的{s}"),
        ("麻烦画一下{s}，要{st}", "{s}，{st}"),
        ("我需要一张{s}做海报，{x}", "{s}海报，{x}"),
        ("生成一张图：{s}", "{s}"),
        ("画一幅{s}吧，{st}风格", "{s}，{st}"),
        ("请帮我绘制{s}", "{s}"),
        ("给我来张{st}的{s}", "{st}的{s}"),
        ("帮忙做个{s}的图片", "{s}"),
        ("想要一张{s}，{x}", "{s}，{x}"),
        ("用{st}画一下{s}", "{st}的{s}"),
        ("出图：{s}，{st}，{x}", "{s}，{st}，{x}"),
        ("可以生成一张{s}的照片吗", "{s}的照片"),
        ("帮我画张{s}当头像", "{s}，头像"),
        ("来个{s}的壁纸", "{s}壁纸"),
    ],
    "en": [
        ("draw {s}", "{s}"),
        ("Can you draw {s}?", "{s}"),
        ("Generate an image of {s} in {st}", "{s}, {st}"),
        ("I'd like a picture of {s}, {st}", "{s}, {st}"),
        ("make me a {st} picture of {s}", "{s}, {st}"),
        ("Please create an illustration of {s}, {x}", "illustration of {s}, {x}"),
        ("could you make an image of {s}", "{s}"),
        ("show me {s} in {st} please", "{s}, {st}"),
        ("I need an image of {s} for my slides", "{s}, presentation cover"),
        ("paint {s}", "{s}, painting"),
        ("Render {s}, {st}, {x}", "{s}, {st}, {x}"),
        ("can u generate {s} pls", "{s}"),
        ("give me a picture of {s}", "{s}"),
        ("Create {s} in {st}", "{s}, {st}"),
        ("Sketch {s} for me", "sketch of {s}"),
        ("would love a {st} image of {s}", "{s}, {st}"),
        ("make a wallpaper of {s}, {x}", "wallpaper of {s}, {x}"),
        ("Draw me {s}!", "{s}"),
        ("an image of {s} please, {st}", "{s}, {st}"),
        ("generate {s}", "{s}"),
        ("Could you whip up a quick {st} drawing of {s}?", "{s}, {st} drawing"),
        ("I want a photo-style image of {s}", "{s}, photo style"),
    ],
    "mixed": [
        ("幫我 generate 一張{s}", "{s}"),
        ("可以 draw 一下{s}嗎", "{s}"),
        ("來張 {st_en} style 的{s}", "{s}，{st_en} style"),
        ("幫我畫 {s_en}，要 {st_en}", "{s_en}, {st_en}"),
        ("生成一張 {s_en} 的圖", "{s_en}"),
        ("please 幫我畫{s}", "{s}"),
        ("我想要一張 {st_en} 的 {s_en}", "{s_en}, {st_en}"),
        ("帮我 draw {s_en} 谢谢", "{s_en}"),
        ("給我一張{s}，aspect ratio 16:9", "{s}，16:9"),
        ("make 一張{s}的圖 plz", "{s}"),
        ("畫一個 {s_en}，{st}", "{s_en}，{st}"),
        ("can you 畫{s}", "{s}"),
        ("来一张 {s_en}，{st_cn}", "{s_en}，{st_cn}"),
    ],
    "discord": [
        ("<@{uid}> 幫我畫{s} 🙏", "{s}"),
        ("<@{uid}> draw {s_en} pls 🥺", "{s_en}"),
        ("yo bot make {s_en} lol", "{s_en}"),
        ("畫{s}啦 快點 XD", "{s}"),
        ("欸欸 可以畫{s}ㄇ", "{s}"),
        ("plz drwa {s_en} 🎨", "{s_en}"),
        ("genrate {s_en} in {st_en} style!!", "{s_en}, {st_en}"),
        ("{s}！！！畫給我 😭", "{s}"),
        ("bot 來張{s} {st} 🔥🔥", "{s}，{st}"),
        ("<@{uid}> 整一张{s_cn}", "{s_cn}"),
        ("@bot 生一張{s}好ㄅ", "{s}"),
        ("🎨 {s_en} 🎨 go", "{s_en}"),
        ("gimme {s_en} rn 😤", "{s_en}"),
        ("幫畫{s}感恩 🙇", "{s}"),
        ("can i get {s_en}?? {st_en} vibes ✨", "{s_en}, {st_en}"),
    ],
}

# ---------------------------------------------------------------- edit requests (calls)
# (user text, prompt) written per language; references to "this photo" etc.
EDITS = {
    "zh-TW": [
        ("請幫我調暗照片的顏色", "將照片色調調暗"),
        ("把這張照片變成吉卜力風格", "照片轉為吉卜力風格"),
        ("幫我把背景換成海邊", "背景換成海邊"),
        ("把這張圖轉成黑白的", "圖片轉為黑白"),
        ("照片太暗了，幫我調亮一點", "照片調亮"),
        ("幫我在照片中加上插圖", "在照片中加入插圖元素"),
        ("把我的自拍變成動漫風", "自拍轉為動漫風格"),
        ("把照片裡的天空換成星空", "照片天空換成星空"),
        ("幫我把這張圖改成油畫質感", "圖片改為油畫質感"),
        ("去掉背景裡的路人", "移除背景中的路人"),
        ("幫我的貓咪照片加一頂聖誕帽", "貓咪照片加上聖誕帽"),
        ("把這張風景照改成冬天下雪的樣子", "風景照改成冬天下雪"),
        ("換個風格，譬如說陰暗些", "陰暗風格重調"),
        ("請根據參考圖的風格重畫一張", "依參考圖風格重畫"),
        ("把這張照片變成像素風", "照片轉為像素風"),
        ("幫我把圖片的顏色調成復古色調", "圖片調成復古色調"),
        ("把我家狗狗的照片畫成水彩", "狗狗照片轉為水彩畫"),
        ("在這張圖的右下角加上我們的 logo", "右下角加上 logo"),
        ("幫我修掉照片上的痘痘", "修掉照片上的痘痘"),
        ("把這張圖的背景弄模糊一點", "背景模糊化"),
        ("把頭髮顏色改成粉紅色", "頭髮改成粉紅色"),
        ("這張圖幫我擴展成橫式的", "將圖片擴展為橫式構圖"),
        ("把照片裡的人換成卡通人物", "照片人物換成卡通風格"),
        ("幫我把這張圖加上夕陽的光線", "加上夕陽光線"),
        ("我要的不是這種，請再照參考圖的風格做一次", "依參考圖更精確呈現風格"),
        ("把這張圖改成賽博龐克風", "圖片改為賽博龐克風格"),
        ("把照片裁成正方形然後加上邊框", "照片裁成正方形並加邊框"),
        ("幫我把這張畫上色", "為線稿上色"),
        ("把這張照片變成鉛筆素描", "照片轉為鉛筆素描"),
        ("讓這張圖看起來像老照片", "圖片做舊成老照片效果"),
    ],
    "zh-CN": [
        ("帮我把这张照片调暗一点", "照片调暗"),
        ("把这张图转成宫崎骏风格", "图片转为宫崎骏风格"),
        ("帮我把背景换成雪山", "背景换成雪山"),
        ("把照片变成黑白的", "照片转为黑白"),
        ("给这张图加个彩虹", "图片加上彩虹"),
        ("把我的头像改成像素风", "头像改成像素风"),
        ("帮我P掉照片里的电线杆", "移除照片中的电线杆"),
        ("把这张自拍变成漫画风格", "自拍转为漫画风格"),
        ("照片颜色太灰了，调鲜艳一点", "照片色彩调鲜艳"),
        ("帮我给这张线稿上色", "线稿上色"),
        ("把天空改成晚霞", "天空改成晚霞"),
        ("把图里的猫换成狗", "图中的猫换成狗"),
        ("帮我把这张图扩成横版", "图片扩展为横版"),
        ("给这张照片加上下雨的效果", "照片加上下雨效果"),
        ("把这张图改成赛博朋克风", "图片改为赛博朋克风格"),
        ("帮我把衣服颜色换成红色", "衣服颜色换成红色"),
        ("把这个 logo 改成金属质感", "logo 改成金属质感"),
        ("把照片做成油画效果", "照片转为油画效果"),
        ("再暗黑一点，换个风格", "更暗黑的风格重调"),
        ("把背景虚化一下", "背景虚化"),
    ],
    "en": [
        ("make this photo darker", "darken the photo"),
        ("turn this photo into Ghibli style", "convert the photo to Studio Ghibli style"),
        ("change the background to a beach", "replace the background with a beach"),
        ("make this pic black and white", "convert the picture to black and white"),
        ("remove the person in the background", "remove the person in the background"),
        ("add a party hat to my cat in this photo", "add a party hat to the cat in the photo"),
        ("can you turn my selfie into an anime character", "selfie as an anime character"),
        ("replace the sky with a starry night", "replace the sky with a starry night sky"),
        ("make it look like an oil painting", "oil painting version of the image"),
        ("brighten up this photo a bit", "brighten the photo"),
        ("colorize this old black and white photo", "colorize the old black and white photo"),
        ("add snow to this landscape", "add snow to the landscape"),
        ("make the colors warmer", "warmer color grading of the image"),
        ("extend this image to a wider 16:9 frame", "extend the image to 16:9"),
        ("put sunglasses on the dog", "add sunglasses to the dog"),
        ("turn this sketch into a finished illustration", "finished illustration from the sketch"),
        ("make this look like a pixel art game sprite", "pixel art sprite version of the image"),
        ("redo it in a darker, moodier style", "darker, moodier restyle"),
        ("blur the background please", "blur the background"),
        ("change her hair to blue", "change the hair color to blue"),
        ("Restyle my room photo as a cozy watercolor", "cozy watercolor version of the room photo"),
        ("add our server logo in the corner", "add the server logo in the corner"),
    ],
    "mixed": [
        ("幫我把這張 photo 變成 Ghibli style", "photo 轉為 Ghibli style"),
        ("把背景換成 cyberpunk city", "背景換成 cyberpunk city"),
        ("這張 selfie 幫我 anime 化", "selfie 轉為動漫風格"),
        ("make 這張圖 darker 一點", "圖片調暗"),
        ("把 logo 改成 neon 風格", "logo 改成 neon 風格"),
        ("帮我把这张 pic 调成 vintage 色调", "图片调成 vintage 色调"),
        ("remove 照片裡的路人 plz", "移除照片中的路人"),
        ("這張 add 一個 rainbow", "圖片加上彩虹"),
    ],
    "discord": [
        ("<@{uid}> 這張幫我調暗 🙏", "圖片調暗"),
        ("pls make my pfp pixel art 👾", "profile picture as pixel art"),
        ("幫我P圖 把我變成貓 😹", "把照片中的人變成貓"),
        ("yo can u remove the guy behind me lol", "remove the person in the background"),
        ("這張圖可以加點閃電特效嗎⚡", "圖片加上閃電特效"),
        ("make it ghibli 🥺🥺", "convert the image to Studio Ghibli style"),
        ("<@{uid}> 背景換成外太空 🚀", "背景換成外太空"),
        ("把我的頭貼加個皇冠 👑", "頭貼加上皇冠"),
    ],
}

# ---------------------------------------------------------------- chat (negatives)
QUESTIONS_ABOUT_IMAGES = {
    "zh-TW": ["這張照片的作者是誰?", "請問圖片中有幾個人?", "這張圖是在哪裡拍的？", "這張照片是 AI 生成的嗎？",
              "圖片的大小比例是多少呢?", "這照片是不是有什麼資訊", "請給我這張圖片的來源網址", "這張圖用的是什麼字體？",
              "這張照片是用什麼相機拍的？", "這幅畫是哪個年代的作品？", "你覺得這張圖哪裡怪怪的？", "這張圖可以商用嗎？",
              "這張{s}的圖，構圖有什麼特別的嗎？", "你能描述一下這張{s}的配色嗎？", "這種照片的風格是什麼?",
              "為什麼這張照片看起來這麼模糊？", "這張圖的解析度夠印 A3 嗎？", "圖裡那隻貓是什麼品種？"],
    "zh-CN": ["这张图是谁画的？", "图里有几只猫？", "这张照片是在哪拍的？", "这图是不是 AI 画的", "这张图片多大分辨率？",
              "这张图的版权归谁？", "这张{s}的图用了什么构图技巧？", "图片里的文字写的是什么？", "这是哪部动漫的截图？",
              "为什么这张照片发灰？", "这张图能拿来做头像吗？", "这幅画用了哪些颜色？"],
    "en": ["who took this photo?", "how many people are in this picture?", "Is this image AI generated?",
           "what's the resolution of this image?", "where was this photo taken?", "what font is used in this poster?",
           "What camera settings would give a photo like this?", "Can I use this image commercially?",
           "what breed is the dog in this pic?", "why does this photo look so grainy?", "What's the style of this painting called?",
           "Can you describe the colors in this {s_en} picture?", "is this picture photoshopped?", "What does the sign in the image say?"],
    "mixed": ["這張 pic 是誰拍的？", "這個 wallpaper 的 resolution 是多少", "这张图是 AI generated 的吗", "這張圖的 color palette 是什麼"],
    "discord": ["<@{uid}> 這張圖哪來的啊 😂", "lol who made this meme", "這張是 AI 畫的吧 XD", "bro what is this pic 💀", "這圖有沒有原圖啊"],
}

ART_ADVICE = {
    "zh-TW": ["吉卜力風格的主要元素有哪些？", "這素描的方式可以教學嗎?", "水彩和壓克力顏料有什麼不同？", "新手要怎麼開始學畫畫？",
              "畫人物的手有什麼技巧？", "請推薦三個免版稅圖片素材網站", "什麼是三分法構圖？", "怎麼讓照片的色調更有電影感？",
              "Procreate 有推薦的筆刷嗎？", "{st}是怎麼來的？有什麼代表畫家？", "怎麼畫出{st}的感覺？", "拍夜景要怎麼設定相機？",
              "數位繪圖板要買哪一款比較好？", "學 Blender 要從哪裡開始？", "配色有什麼好用的網站？", "怎麼用 Midjourney 寫好提示詞？",
              "畫{s}的時候要注意什麼？", "透視要怎麼練習？", "人像攝影用什麼焦段比較好？"],
    "zh-CN": ["赛博朋克风格有什么特点？", "零基础怎么学画画？", "板绘用什么软件好？", "怎么画好人体比例？", "有哪些免费可商用的图库？",
              "摄影构图有哪些常用技巧？", "怎么调出日系小清新的色调？", "{st_cn}有什么代表作品？", "水墨画和油画的区别是什么？",
              "怎么提高画画速度？", "PS 里怎么抠图？", "画{s_cn}要怎么构图比较好看？"],
    "en": ["What are the main elements of Ghibli style?", "how do I get better at drawing hands?",
           "What's the difference between watercolor and gouache?", "any tips for composing a landscape photo?",
           "Recommend three royalty-free stock image sites", "what's the rule of thirds?", "How do I learn digital painting as a beginner?",
           "Which drawing tablet should I buy?", "what is {st} and where did it come from?", "How do I write good prompts for image models?",
           "What brushes are good for line art in Procreate?", "how to draw {s_en} step by step?", "Any advice for color grading portraits?"],
    "mixed": ["怎麼畫出 Ghibli 的感覺？", "Procreate 的 brush 要怎麼選", "有推薦的 color palette 網站嗎", "學 digital art 要從哪開始"],
    "discord": ["有人知道怎麼畫手嗎 😭", "大佬們 板繪推薦哪款", "how do yall shade so good 😩", "新手求推薦繪圖軟體 🙏"],
}

NON_IMAGE_GENERATE = {
    "zh-TW": ["幫我生成一份三天兩夜的台南旅遊計畫", "幫我畫重點：這篇文章在講什麼？", "幫我生成一個強密碼", "幫我想五個貓咪的名字",
              "幫我寫一段 Python 爬蟲程式", "產生一份週報的範本", "請幫我做一個讀書計畫表", "從這些數據可以畫出什麼結論？",
              "老闆又在畫大餅了，怎麼辦", "幫我生成一首關於秋天的詩", "幫我列一張購物清單", "幫我出十題英文單字測驗",
              "幫我規劃一下這週的健身菜單", "請幫我產生一封請假信", "生成一個隨機數字 1 到 100", "幫我整理會議記錄的重點",
              "幫我寫個自我介紹", "幫我想一個頻道名稱", "幫我畫一下這個專案的時程規劃", "幫我生成一個 SQL 查詢找出最近的訂單"],
    "zh-CN": ["帮我生成一份周末露营清单", "帮我写一个 shell 脚本批量改名", "给我画个饼吧哈哈", "帮我总结一下这段话的重点",
              "生成一个 UUID", "帮我列个学习计划", "帮我写一段生日祝福", "帮我想个队名", "从这个图表能得出什么结论？",
              "帮我生成十个面试问题", "帮我起个公众号名字", "写一段 JavaScript 倒计时代码"],
    "en": ["generate a list of names for my cat", "draw a conclusion from these survey results", "generate a strong password",
           "write a python script that renames files", "make a study plan for my exams", "Generate a SQL query for last week's orders",
           "create a packing list for a beach trip", "give me 10 trivia questions about space", "draft an email asking for a day off",
           "generate a random number between 1 and 50", "make me a workout plan", "write a haiku about coffee",
           "draw up a budget for a small party", "generate some ideas for a server event", "can you draw straws for us: Amy, Ben, Chris?"],
    "mixed": ["幫我 generate 一個 password", "幫我寫個 Python script", "帮我 draft 一封 email", "幫我 list 一下明天要做的事"],
    "discord": ["bot 幫我想個伺服器活動 🎉", "gen me a random team for tonight lol", "幫我抽一個人去買飲料 XD", "<@{uid}> 寫首詩給我 💕"],
}

BARE_REQUESTS = {
    "zh-TW": ["嗨，幫我生成張圖片吧！", "幫我畫畫", "給我一張圖", "可以幫我做圖嗎？", "我想要一張圖片", "畫點什麼吧",
              "來張圖", "幫我生圖", "你會畫圖嗎？", "隨便畫一張給我", "能幫我產生圖片嗎", "我需要一張圖"],
    "zh-CN": ["帮我画张图", "给我来张图片", "能生成图片吗？", "帮我出个图", "你能画画吗", "随便画点什么"],
    "en": ["make me a picture!", "draw something", "can you make an image?", "generate an image", "I want a picture",
           "can you draw?", "make art", "give me an image pls"],
    "mixed": ["幫我 generate 一張圖", "draw 一張給我", "make 一張圖"],
    "discord": ["bot 畫圖 🎨", "pic pls 🥺", "<@{uid}> 生圖", "draw pls lol"],
}

SMALL_TALK = {
    "zh-TW": ["今天好累喔", "推薦一部好看的電影", "台北明天會下雨嗎？", "你叫什麼名字？", "晚餐吃什麼好", "早安！", "有人要一起打遊戲嗎",
              "你覺得貓派還是狗派？", "剛剛的比賽太精彩了", "這個伺服器的規則在哪看？", "怎麼煮好吃的泡麵？", "珍奶要全糖還是半糖",
              "週末有什麼推薦的活動？", "你會講台語嗎？", "幫我翻譯 good morning", "幾點了？", "最近有什麼好聽的歌",
              "我的電腦一直當機怎麼辦", "謝謝你！", "晚安各位", "今天的天空好漂亮", "考試考砸了QQ"],
    "zh-CN": ["今天好热啊", "推荐几本好书", "明天上海天气怎么样", "你是谁", "晚饭吃啥", "早上好", "有人开黑吗", "猫和狗你更喜欢哪个",
              "这周末去哪玩", "怎么做红烧肉", "谢谢！", "晚安", "最近在追什么剧", "电脑蓝屏了咋办"],
    "en": ["good morning everyone", "what's your name?", "recommend a good movie", "how's the weather in Tokyo today?", "gg that was close",
           "anyone up for a game?", "cats or dogs?", "what should I eat for dinner", "thanks bot!", "good night", "how do I reset my router?",
           "what's the capital of Australia?", "tell me a joke", "I'm bored", "who won the match last night?"],
    "mixed": ["今天 meeting 好多好累", "有人要 play 嗎", "這個 bug 怎麼 fix", "晚點 online 一起打", "thanks 你超棒"],
    "discord": ["lol", "gg ez", "早安 ☀️", "💀💀💀", "XDDD", "ㄏㄏ", "😂😂😂", "+1", "brb", "有人在嗎 👀", "笑死", "好耶 🎉", "w", "ok"],
}

# ---------------------------------------------------------------- chat replies
REPLIES = {
    "question": {
        "zh-TW": ["我看不到圖片的完整資訊，不過可以從畫面內容、EXIF 或來源網站來判斷，你可以貼上更多細節嗎？",
                  "這需要看圖片本身的細節。一般可以從構圖、光線和色彩來分析，要不要描述一下你看到的內容？",
                  "單從描述很難確定，建議用以圖搜圖找原始出處，或查看檔案的 EXIF 資訊。"],
        "zh-CN": ["我看不到图片的全部信息，可以通过以图搜图或查看 EXIF 来确认，方便发一下更多细节吗？",
                  "这要看图片本身。一般从构图、光线和色彩来分析，你可以描述一下画面吗？"],
        "en": ["I can't see all the details of the image, but a reverse image search or the EXIF data usually tells you. Can you share more?",
               "That depends on the image itself: composition, lighting and colors are the usual clues. What do you see in it?"],
    },
    "advice": {
        "zh-TW": ["可以從觀察和大量練習開始：先臨摹參考作品，再慢慢加入自己的變化，也推薦看一些教學影片。",
                  "重點是先掌握基本功，例如比例、透視和光影，再選一兩個喜歡的藝術家研究他們的作品。",
                  "這個風格通常有柔和的色彩、細膩的背景和溫暖的光線，多看原作並做色彩分析會很有幫助。"],
        "zh-CN": ["建议先打好基础：比例、透视、光影，然后多临摹、多练习，也可以看看相关教程。",
                  "可以从模仿喜欢的作品开始，拆解它的配色和构图，再慢慢形成自己的风格。"],
        "en": ["Start with the fundamentals (proportion, perspective, light) and study references you like; short daily practice helps a lot.",
               "Break down works you admire: look at their palette, composition and edges, then try small studies of your own."],
    },
    "task": {
        "zh-TW": ["沒問題，這是我整理的版本：\n1. 先列出目標\n2. 拆成小步驟\n3. 安排時間並追蹤進度",
                  "好的！給你一個開始的方向，如果需要調整再跟我說。", "可以，我們一步一步來，先告訴我更多需求細節吧。"],
        "zh-CN": ["没问题，先给你一个初版：\n1. 明确目标\n2. 拆分步骤\n3. 安排时间", "好的，我先给一个方案，有需要再改。"],
        "en": ["Sure! Here's a first draft:\n1. Define the goal\n2. Break it into steps\n3. Schedule and review",
               "Happy to help. Here's a starting point; tell me what to adjust."],
    },
    "bare": {
        "zh-TW": ["好啊！你想要什麼樣的圖片呢？告訴我主題、風格或構圖，我就幫你畫。", "你好，你想要怎麼樣的圖片呢?",
                  "沒問題～想畫什麼內容？例如角色、場景或風格都可以跟我說。"],
        "zh-CN": ["好呀！你想要什么样的图？告诉我主题和风格吧。", "可以的，你想画什么内容呢？"],
        "en": ["Sure! What would you like me to draw? Tell me the subject and style.", "Happy to! What should the picture show?"],
    },
    "chat": {
        "zh-TW": ["哈哈，我懂你的感覺！", "好問題，我想想……", "辛苦了，休息一下吧！", "可以呀，我們來聊聊。", "謝謝你～有需要再叫我！"],
        "zh-CN": ["哈哈，懂你！", "好问题，我想想……", "辛苦啦，休息一下吧！", "可以呀，来聊聊。"],
        "en": ["Haha, I feel you!", "Good question, let me think...", "Hang in there!", "Sure, let's chat.", "Anytime!"],
    },
}

LANG_OF_REPLY = {"zh-TW": "zh-TW", "zh-CN": "zh-CN", "en": "en", "mixed": "zh-TW", "discord": "zh-TW"}


def fill(template, rng, subj, style, extra):
    s_tw, s_cn, s_en = subj
    st_tw, st_cn, st_en = style
    x_tw, x_cn, x_en = extra
    uid = str(rng.randrange(10 ** 17, 10 ** 18))
    return template.format(s=s_tw, s_cn=s_cn, s_en=s_en, st=st_tw, st_cn=st_cn, st_en=st_en, x=x_tw, uid=uid)


def localize(template_pair, lang, rng, subj, style, extra):
    """Fills a (user, prompt) pair; zh-CN and en use their own fragments."""
    user_t, prompt_t = template_pair
    s_tw, s_cn, s_en = subj
    st_tw, st_cn, st_en = style
    x_tw, x_cn, x_en = extra
    if lang == "zh-CN":
        s, st, x = s_cn, st_cn, x_cn
    elif lang == "en":
        s, st, x = s_en, st_en, x_en
    else:
        s, st, x = s_tw, st_tw, x_tw
    uid = str(rng.randrange(10 ** 17, 10 ** 18))
    kw = dict(s=s, st=st, x=x, s_cn=s_cn, s_en=s_en, st_cn=st_cn, st_en=st_en, uid=uid)
    return user_t.format(**kw), prompt_t.format(**kw)


def split_templates(items, rng, test_share=0.2):
    items = list(items)
    rng.shuffle(items)
    k = max(1, round(len(items) * test_share))
    return items[k:], items[:k]


def has_cjk(text):
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def reply_for(kind, lang, text, rng):
    """A reply in the user's language (Discord and mixed rows: by script)."""
    reply_lang = LANG_OF_REPLY[lang] if has_cjk(text) or lang in ("zh-TW", "zh-CN") else "en"
    return rng.choice(REPLIES[kind][reply_lang])


def build():
    rng = random.Random(SEED)
    langs = ["zh-TW", "zh-CN", "en", "mixed", "discord"]
    # Share of rows per language: Traditional Chinese first.
    weight = {"zh-TW": 0.34, "zh-CN": 0.2, "en": 0.22, "mixed": 0.1, "discord": 0.14}
    splits = {"train": [], "test": []}
    # The original seed rows stay in seed.jsonl only: no user text repeats.
    with open(os.path.join(HERE, "seed.jsonl")) as f:
        seen = {json.loads(line)["messages"][0]["content"].strip() for line in f if line.strip()}

    def add(split, user, reply, lang, kind):
        key = user.strip()
        if key in seen or not key:
            return False
        seen.add(key)
        splits[split].append({
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
            "meta": {"lang": lang, "kind": kind},
        })
        return True

    targets = {"train": 1215, "test": 300}  # per label (call / chat)
    # ---- calls: create (75%) + edit (25%)
    for lang in langs:
        tr_create, te_create = split_templates(CREATE[lang], rng)
        tr_edit, te_edit = split_templates(EDITS[lang], rng)
        for split, creates, edits in (("train", tr_create, tr_edit), ("test", te_create, te_edit)):
            goal = round(targets[split] * weight[lang])
            n_edit = min(len(edits) * 2, round(goal * 0.25))
            made = 0
            tries = 0
            while made < goal - n_edit and tries < goal * 50:
                tries += 1
                t = rng.choice(creates)
                u, p = localize(t, lang, rng, rng.choice(SUBJECTS), rng.choice(STYLES), rng.choice(EXTRAS))
                made += add(split, u, call(p), lang, "create")
            made_edit = 0
            pool = list(edits)
            rng.shuffle(pool)
            for u_t, p in pool:
                if made_edit >= n_edit:
                    break
                u = u_t.format(uid=str(rng.randrange(10 ** 17, 10 ** 18)))
                made_edit += add(split, u, call(p), lang, "edit")
                # A second phrasing with a polite tail doubles the edit shapes.
                tail = {"zh-TW": "，謝謝", "zh-CN": "，谢谢", "en": ", thanks", "mixed": " thx", "discord": " 🙏"}[lang]
                if made_edit < n_edit:
                    made_edit += add(split, u + tail, call(p), lang, "edit")
    # ---- chat
    chat_groups = [
        ("question", QUESTIONS_ABOUT_IMAGES, 0.22),
        ("advice", ART_ADVICE, 0.22),
        ("task", NON_IMAGE_GENERATE, 0.22),
        ("bare", BARE_REQUESTS, 0.12),
        ("chat", SMALL_TALK, 0.22),
    ]
    prefixes = {
        "zh-TW": ["", "請問", "欸，", "想問一下，", "嗨～", "不好意思，", "我想知道，", "想請教：", "朋友問我，", "對了，", "哈囉，"],
        "zh-CN": ["", "请问", "问一下，", "哈喽，", "那个，", "想请教一下，", "对了，", "大家好，"],
        "en": ["", "hey, ", "quick question: ", "hi! ", "so ", "honestly ", "ok so ", "random q: ", "btw "],
        "mixed": ["", "欸 ", "hey ", "請問 ", "btw "],
        "discord": ["", "<@{uid}> ", "yo ", "欸欸 ", "@bot "],
    }
    suffixes = {
        "zh-TW": ["", "？", "～", "!", " 謝謝", "，拜託", " 🙏", "呢", "啊"],
        "zh-CN": ["", "？", "~", "!", " 谢谢", "呀", "呢"],
        "en": ["", "?", " thanks", " :)", "!", " pls", " lol"],
        "mixed": ["", " thx", "?", " 🙏"],
        "discord": ["", " 😂", " 🥺", " XD", " lol", "!!", " 👀"],
    }
    for kind, groups, share in chat_groups:
        for lang in langs:
            base = groups.get(lang, [])
            if not base:
                continue
            tr, te = split_templates(base, rng)
            for split, pool in (("train", tr), ("test", te)):
                goal = round(targets[split] * weight[lang] * share / 0.2 * 0.2)
                made = tries = 0
                while made < goal and tries < goal * 60:
                    tries += 1
                    text = fill(rng.choice(pool), rng, rng.choice(SUBJECTS), rng.choice(STYLES), rng.choice(EXTRAS))
                    pre = rng.choice(prefixes[lang]).format(uid=str(rng.randrange(10 ** 17, 10 ** 18)))
                    suf = rng.choice(suffixes[lang])
                    user = pre + text.rstrip("？?") + (suf if suf else ("？" if text.endswith("？") else ("?" if text.endswith("?") else "")))
                    made += add(split, user, reply_for(kind, lang, user, rng), lang, kind)
    return splits


def main():
    splits = build()
    for split, rows in splits.items():
        random.Random(SEED + len(split)).shuffle(rows)
        path = os.path.join(HERE, f"image_call_{split}.jsonl")
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        calls = sum(1 for r in rows if r["messages"][1]["content"].startswith("call("))
        print(f"{path}: {len(rows)} rows, {calls} calls, {len(rows) - calls} chat")


if __name__ == "__main__":
    main()
