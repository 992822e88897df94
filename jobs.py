"""Long sampling jobs: N images made in batches, shared out among the processes of torchrun, and kept on disk as they
are made, so that a stopped job goes on from where it stopped. What sample.py and evaluate.py share.

    rank, world_size = join()                                 # torchrun's process group, or (0, 1) alone
    job = SamplingJob(folder, settings, num_images, batch_size, (H, W, 3), calls_per_batch, device)
    images = job.run(make_batch)   # uint8 (N, H, W, 3) on rank 0 (None on the others); make_batch(start, count,
                                   # on_call) -> float (count, C, H, W) in [-1, 1], images start ... start + count - 1
    job.close()                    # on rank 0, once the output is written: the kept batches are deleted

Image i is always in batch k = i // batch_size, whatever the number of processes: the batches not yet made are
shared out W at a time (a round), process r making the round's r-th, and rank 0 gathers the round's batches and
writes them to the job's folder. As every image draws its noise from its own seed (inference.image_generators), W
processes make exactly the images, in the same order, that one process makes with the same flags; a test checks it
bit for bit.

The folder holds settings.json (what made the images: the model's fingerprint and diffusion, the sampler and its
options, the seed, the batch size, the device and precision, the torch version) and batch_000000.npy, ... A job
that finds its folder checks the settings and makes only the batches that are missing (a damaged one is deleted and
made again); with other settings it stops and says which differ, so that one output never mixes images of two
settings. Jobs that fit in one round keep nothing on disk.
"""

import datetime
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import config
import inference
import utils
from config import UserError
from samplers import SAMPLERS


class JobStopped(UserError):
    """The job got SIGINT or SIGTERM and stopped after a round; what it made is kept (the message says where)."""


# The other processes wait while the first one downloads or trains a metric's weights (evaluate.py), which can take
# longer than torch's default of 10-30 minutes.
JOIN_TIMEOUT = datetime.timedelta(hours=2)


def join():
    """(rank, world_size): under torchrun, join the process group (gloo on CPUs, NCCL on GPUs, as training does)."""
    rank, _, world_size = utils.setup_distributed(JOIN_TIMEOUT)
    return rank, world_size


def first_process():
    """Whether this process prints and writes the outputs: rank 0 under torchrun, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def run_script(run, opts):
    """What the main() of sample.py and evaluate.py share: join torchrun's processes (if any), call
    run(opts, world_size), leave. Returns the paths it wrote on the first process, None on the others; a UserError
    exits with its one sentence, printed by the first process (every process meets the same mistake)."""
    rank, world_size = join()
    try:
        written = run(opts, world_size)
    except UserError as error:
        utils.leave_distributed(wait=True)  # every process met the same mistake, so all of them get here
        if rank == 0:
            config.fail(error)
        sys.exit(1)
    except BaseException:
        utils.leave_distributed(wait=False)
        raise
    utils.leave_distributed(wait=True)
    return written if rank == 0 else None


def on_first_process(function):
    """Run function() on rank 0 alone (a download, a classifier to train, a check that reads a file) and return its
    result there (None elsewhere). A UserError it raises is raised on every process, so that all of them stop with
    the same sentence instead of waiting for rank 0 forever."""
    if not dist.is_initialized():
        return function()
    result, message = None, None
    if dist.get_rank() == 0:
        try:
            result = function()
        except UserError as error:
            message = str(error)
    shared = [message]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise UserError(shared[0])
    return result


def fingerprint(model):
    """A short sha1 of the model's weights (names, shapes, dtypes and values): which model made a job's images.
    A torch.compile wrapper is seen through (whether it was compiled is a setting of its own)."""
    digest = hashlib.sha1()
    for name, tensor in getattr(model, "_orig_mod", model).state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class SamplingJob:
    """num_images images in batches of batch_size, shared among the processes; see the module docstring.

    folder: where the job keeps its batches until close(); settings: a dict of JSON values, everything that makes
    the images what they are; image_shape: (H, W, 3); calls_per_batch: the network calls of one batch (the progress
    bar counts them); device: where the images are made (a GPU job exchanges its batches through NCCL there).
    """

    def __init__(self, folder, settings, num_images, batch_size, image_shape, calls_per_batch, device):
        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the file
        self.num_images = num_images
        self.batch_size = batch_size
        self.image_shape = tuple(image_shape)  # (H, W, 3): the uint8 images utils.to_uint8 gives
        self.calls_per_batch = max(calls_per_batch, 1)
        # Where the batches are exchanged: NCCL's side of the group for a GPU job, gloo's for a CPU one.
        self.device = device if device.type == "cuda" and dist.is_initialized() else torch.device("cpu")
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.num_batches = math.ceil(num_images / batch_size)
        # A new job of one round keeps nothing on disk (there is nothing to continue from); a folder that is there
        # already is continued in any case.
        self.keeps_batches = self.num_batches > self.world_size or self.folder.exists()

    def write(self, path, write):
        """utils.write_atomically, with an error for people."""
        try:
            utils.write_atomically(path, write)
        except OSError as error:
            raise UserError(f"could not write {path} ({error.strerror or error}); the images made before it are "
                            f"kept in {self.folder}") from None

    def batch_path(self, index):
        return self.folder / f"batch_{index:06d}.npy"

    def images_in(self, first_batch, last_batch):
        """The number of images in batches first_batch ... last_batch - 1."""
        return min(last_batch * self.batch_size, self.num_images) - min(first_batch * self.batch_size, self.num_images)

    def open(self):
        """On rank 0: the indices of the batches already made (none for a new job), after checking the folder's
        settings. A kept batch that does not read back as this job's (a damaged file) is deleted, to be made again
        with the other missing ones."""
        if not self.keeps_batches:
            return []
        settings_path = self.folder / "settings.json"
        if not settings_path.exists():
            text = json.dumps(self.settings, indent=2) + "\n"
            self.write(settings_path, lambda f: f.write(text.encode()))
            return []
        try:
            saved = json.loads(settings_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UserError(f"{settings_path} cannot be read; delete the folder {self.folder} to start the job "
                            f"afresh") from None
        differ = sorted(key for key in {*saved, *self.settings} if saved.get(key) != self.settings.get(key))
        if differ:
            batches = len(list(self.folder.glob("batch_*.npy")))
            held = min(batches * saved.get("batch_size", 0), saved.get("num_samples", 0))  # in the saved batch size
            shown = ", ".join(f"{key} {saved.get(key)!r}, now {self.settings.get(key)!r}" for key in differ[:4])
            if any(key not in saved for key in differ):
                raise UserError(f"{self.folder} holds {held} images of an unfinished job made by an earlier version, "
                                f"which kept fewer settings ({shown}), so it cannot be finished safely; delete that "
                                f"folder to start afresh (nothing was deleted)")
            raise UserError(f"{self.folder} holds {held} images of an unfinished job made with other settings "
                            f"({shown}); run with the same settings to finish it, or delete that folder to start "
                            f"afresh (nothing was deleted)")
        made = []
        for index in range(self.num_batches):
            path = self.batch_path(index)
            if not path.exists():
                continue
            if self.read_batch(index) is None:
                print(f"{path} is damaged; it is made again")
                path.unlink()
            else:
                made.append(index)
        return made

    def run(self, make_batch):
        """Make the images that are not yet made; returns all num_images of them as uint8 (N, H, W, 3) on rank 0,
        None on the others. Raises JobStopped after the round in which SIGINT or SIGTERM came."""
        made = on_first_process(self.open)
        if dist.is_initialized():
            shared = [made]
            dist.broadcast_object_list(shared, src=0)
            made = shared[0]
        todo = sorted(set(range(self.num_batches)) - set(made))
        done_images = sum(self.images_in(index, index + 1) for index in made)
        if made and self.rank == 0:
            print(f"continuing the job in {self.folder}: {done_images:,} of {self.num_images:,} images were made "
                  f"before")
        progress = None
        if self.rank == 0:
            # Whole images in the count, fractions of them in the bar: it moves at every network call.
            progress = tqdm(total=self.num_images, initial=done_images, unit="img", dynamic_ncols=True,
                            desc=f"{self.world_size} process(es)", bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                            "{n:.0f}/{total} images [{elapsed}<{remaining}, {rate_fmt}]")
        kept = {}  # batch index -> uint8 images, for jobs that keep nothing on disk
        stop = utils.StopRequest()
        try:
            for first in range(0, len(todo), self.world_size):
                round_batches = todo[first:first + self.world_size]  # process r makes round_batches[r]
                last_round = first + self.world_size >= len(todo)
                if last_round:
                    stop.restore()  # nothing would be kept after it, so a signal acts at once
                round_images = sum(self.images_in(index, index + 1) for index in round_batches)
                batches = self.make_round(round_batches, make_batch, progress, round_images)
                done_images += round_images
                failure = None
                if self.rank == 0:
                    try:
                        for index, images in batches.items():
                            if self.keeps_batches:
                                self.write(self.batch_path(index), lambda f, images=images: np.save(f, images))
                            else:
                                kept[index] = images
                    except UserError as error:
                        failure = str(error)
                    progress.n = done_images
                    progress.refresh()
                if dist.is_initialized():  # a write that failed on rank 0 stops every process, with its sentence
                    shared = [failure]
                    dist.broadcast_object_list(shared, src=0)
                    failure = shared[0]
                if failure is not None:
                    raise UserError(failure)
                if not last_round and stop.requested(dist.is_initialized(), self.device):
                    raise JobStopped(f"stopped by {stop.signal_name or 'a signal'}: {done_images:,} of "
                                     f"{self.num_images:,} images are kept in {self.folder}; run the same command "
                                     f"again to go on from there")
        finally:
            stop.restore()
            if progress is not None:
                progress.close()
        if self.rank != 0:
            return None
        if not self.keeps_batches:
            return np.concatenate([kept[index] for index in range(self.num_batches)])
        parts = []
        for index in range(self.num_batches):
            images = self.read_batch(index)
            if images is None:
                raise UserError(f"{self.batch_path(index)} was damaged after it was written (expected uint8 images "
                                f"of shape {(self.images_in(index, index + 1), *self.image_shape)}); run the same "
                                f"command again, and the job makes that batch again")
            parts.append(images)
        return np.concatenate(parts)

    def read_batch(self, index):
        """A kept batch as uint8 (count, H, W, 3), or None if its file does not read back as one of this job's."""
        expected = (self.images_in(index, index + 1), *self.image_shape)
        try:
            images = np.load(self.batch_path(index))
        except (OSError, ValueError, EOFError):
            return None
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape != expected:
            return None
        return images

    def make_round(self, round_batches, make_batch, progress, round_images):
        """Process r makes batch round_batches[r] (if there is one); rank 0 gets them all: {index: uint8 images}."""
        index = round_batches[self.rank] if self.rank < len(round_batches) else None
        start = index * self.batch_size if index is not None else 0
        count = self.images_in(index, index + 1) if index is not None else 0

        def on_call():
            if progress is not None:  # rank 0 counts the whole round's images, its own batch as the clock
                progress.update(round_images / self.calls_per_batch)

        images = utils.to_uint8(make_batch(start, count, on_call)) if count else None
        if not dist.is_initialized():
            return {index: images}
        # Every process sends a full batch (zeros past the end), so that the gathered tensors have one shape.
        shape = (self.batch_size, *self.image_shape)
        padded = torch.zeros(shape, dtype=torch.uint8)
        if count:
            padded[:count] = torch.from_numpy(images)
        padded = padded.to(self.device)
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(padded, gathered, dst=0)
        if self.rank != 0:
            return {}
        return {batch: tensor[:self.images_in(batch, batch + 1)].cpu().numpy()
                for batch, tensor in zip(round_batches, gathered)}

    def close(self):
        """Delete the kept batches (on rank 0, after the job's output is written)."""
        if self.rank == 0 and self.keeps_batches and self.folder.exists():
            shutil.rmtree(self.folder)
            parent = self.folder.parent
            if parent.name == UNFINISHED and not any(parent.iterdir()):
                parent.rmdir()


UNFINISHED = "unfinished"  # results/images/RUN/unfinished/<job>/: the batches of jobs not yet finished


def tensor_digest(tensor):
    """A short sha1 of a tensor's values (labels, an input image), or None for None."""
    if tensor is None:
        return None
    return hashlib.sha1(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


# The config fields that change the images beyond the weights: the noise schedule and what the network predicts.
DIFFUSION_FIELDS = ("timesteps", "beta_schedule", "objective", "image_size", "channels")


def make_images(model, diffusion, cfg, opts, num_samples, *, image_dir, name, device, batch_size, amp_dtype=None,
                labels=None, init_image=None, strength=1.0, keep_mask=None):
    """Sample images 0 ... num_samples - 1 as inference.generate does, as one job shared by the processes and kept in
    image_dir/unfinished/NAME_MODEL (MODEL: the start of the model's fingerprint) until close(): (uint8 (N, H, W, 3)
    on rank 0 and None on the others, the job)."""
    settings = dict(
        model=fingerprint(model), sampler=opts.sampler, steps=opts.steps, spacing=opts.timestep_spacing,
        dynamic_threshold=opts.dynamic_threshold,
        **{option: getattr(opts, option) for option in SAMPLERS[opts.sampler].options},  # eta, ddpm_variance, ...
        guidance=opts.guidance_scale, seed=opts.seed, num_samples=num_samples, batch_size=batch_size,
        device=device.type, compile=opts.compile, amp=str(amp_dtype).removeprefix("torch.") if amp_dtype else "none",
        labels=tensor_digest(labels), init_image=tensor_digest(init_image),
        strength=strength if init_image is not None else 1.0, mask=tensor_digest(keep_mask),
        diffusion={name: getattr(cfg, name) for name in DIFFUSION_FIELDS}, torch=torch.__version__,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    calls = inference.network_calls(diffusion, opts, init_image, strength)
    # Named after the output and the model, so that the jobs of two checkpoints never meet; the settings of one
    # model's job are checked when it goes on.
    folder = Path(image_dir) / UNFINISHED / f"{name}_{settings['model'][:8]}"
    job = SamplingJob(folder, settings, num_samples, batch_size, (cfg.image_size, cfg.image_size, 3), calls, device)

    def make_batch(start, count, on_call):
        return inference.generate_batch(
            model, diffusion, cfg, opts, start, count, device=device, amp_dtype=amp_dtype,
            labels=labels[start:start + count] if labels is not None else None, init_image=init_image,
            strength=strength, keep_mask=keep_mask, on_call=on_call)

    return job.run(make_batch), job
