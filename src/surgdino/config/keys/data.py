"""Keys of datasets, input pipeline and data loading."""

from surgdino.config.core import declare as d

d("DATASETS.TRAIN", [], "list[str]", "Names of training datasets (declared in DATASETS.REGISTER or registered from Python).")
d("DATASETS.TEST", [], "list[str]", "Names of evaluation datasets.")
d("DATASETS.REGISTER", [], "list[dict]",
  "COCO datasets declared in the config: list of {name, json_file, image_root}; relative paths are relative to the config file.")
d("DATASETS.SYNTHETIC_ROOT", "", "str", "Where synthetic tray datasets (names 'synthetic_trays_*') are generated; empty = ~/.cache/surgdino.")

d("INPUT.FORMAT", "RGB", "str", "Channel order the model sees.", choices=["RGB", "BGR"])
d("INPUT.MASK_FORMAT", "bitmask", "str", "Masks are decoded to bitmasks in the mapper (polygon kept for detectron2 configs).",
  choices=["bitmask", "polygon"])
d("INPUT.DATASET_MAPPER_NAME", "coco_instance_lsj", "str",
  "Training mapper: coco_instance (resize+flip+crop), coco_instance_lsj (large-scale jitter), coco_instance_copy_paste (LSJ + occlusion-aware copy-paste).",
  choices=["coco_instance", "coco_instance_lsj", "coco_instance_copy_paste"])
d("INPUT.MIN_SIZE_TRAIN", [800], "list[int]", "coco_instance: shortest-edge sizes (one is picked per image).")
d("INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice", "str", "choice: pick one of MIN_SIZE_TRAIN; range: uniform between its two values.",
  choices=["choice", "range"])
d("INPUT.MAX_SIZE_TRAIN", 1333, "int", "coco_instance: longest-edge cap in training.")
d("INPUT.MIN_SIZE_TEST", 800, "int", "Shortest edge at test time; 0 = no resize.")
d("INPUT.MAX_SIZE_TEST", 1333, "int", "Longest-edge cap at test time.")
d("INPUT.RANDOM_FLIP", "horizontal", "str", "Random flip in training.", choices=["horizontal", "vertical", "both", "none"])
d("INPUT.IMAGE_SIZE", 1024, "int", "LSJ / copy-paste: square output size after scale jitter and crop/pad (the document's 1280 = higher resolution).")
d("INPUT.MIN_SCALE", 0.1, "float", "LSJ: smallest scale of IMAGE_SIZE.")
d("INPUT.MAX_SCALE", 2.0, "float", "LSJ: largest scale of IMAGE_SIZE.")
d("INPUT.CROP.ENABLED", False, "bool", "coco_instance: random crop after the flip and shortest-edge resize (so CROP.SIZE is in resized pixels).")
d("INPUT.CROP.TYPE", "absolute_range", "str",
  "relative (fraction of image), relative_range, absolute (pixels), absolute_range (h and w each uniform in SIZE: non-square crops).",
  choices=["relative", "relative_range", "absolute", "absolute_range"])
d("INPUT.CROP.SIZE", [512, 1024], "list[float]", "Crop size, meaning set by CROP.TYPE; absolute_range (512, 1024) = sides between 512 and 1024.")
d("INPUT.COPY_PASTE.PROB", 0.5, "float", "copy_paste mapper: probability that an image gets pasted instances.")
d("INPUT.COPY_PASTE.MAX_PASTED", 10, "int", "copy_paste mapper: at most this many instances pasted from the other image (a random subset of 1..MAX_PASTED).")
d("INPUT.COPY_PASTE.MIN_VISIBLE", 0.1, "float", "Instances whose visible area falls below this fraction of their area before pasting are dropped.")
d("INPUT.SIZE_DIVISIBILITY", 32, "int", "Batched images are padded to a multiple of this (backbones may require more).")
d("INPUT.COLOR_AUG_SSD", False, "bool", "Photometric jitter (brightness, contrast, saturation, hue) in training.")

d("DATALOADER.NUM_WORKERS", 2, "int", "Data-loading worker processes per training process.")
d("DATALOADER.SAMPLER_TRAIN", "TrainingSampler", "str",
  "TrainingSampler (shuffled, infinite) or RepeatFactorTrainingSampler (LVIS-style class-balanced repeats).",
  choices=["TrainingSampler", "RepeatFactorTrainingSampler"])
d("DATALOADER.REPEAT_THRESHOLD", 0.0, "float", "RepeatFactorTrainingSampler (LVIS): a class in a fraction f < t of the images gets repeat factor sqrt(t / f); an image repeats by its rarest class's factor.")
d("DATALOADER.FILTER_EMPTY_ANNOTATIONS", True, "bool", "Drop training images without (non-crowd) instances.")
d("DATALOADER.ASPECT_RATIO_GROUPING", True, "bool", "Batch landscape and portrait images separately (by record width/height; less padding). No effect on LSJ/copy-paste, whose outputs are square.")
